//! The fuzz targets as property tests: each must return (not panic, abort or hang) for
//! its seed corpus and for thousands of seeded random mutations of it, spliced with its
//! dictionary. Deterministic (fixed seeds), so a failure reproduces; a failing input is
//! printed, to be added to `fuzz/corpus/<target>/` and fixed.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds for {target}");
    seeds
}

/// Entries of a libFuzzer dictionary (`"..."` lines, with `\xNN` and `\"` escapes).
fn dictionary(name: &str) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(fuzz_dir().join("dicts").join(name)).unwrap();
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let body = line.strip_prefix('"')?.strip_suffix('"')?;
            let mut out = vec![];
            let mut bytes = body.bytes();
            while let Some(b) = bytes.next() {
                if b != b'\\' {
                    out.push(b);
                    continue;
                }
                match bytes.next() {
                    Some(b'x') => {
                        let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                        out.push(u8::from_str_radix(&hex, 16).unwrap());
                    }
                    Some(other) => out.push(other),
                    None => {}
                }
            }
            Some(out)
        })
        .collect()
}

/// One random edit of `input`: flip, insert, delete, duplicate a range, splice in a
/// dictionary word or part of another seed.
fn mutate(rng: &mut StdRng, input: &[u8], words: &[Vec<u8>], others: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let at = if out.is_empty() {
            0
        } else {
            rng.random_range(0..=out.len())
        };
        match rng.random_range(0..7) {
            0 if !out.is_empty() => {
                let i = rng.random_range(0..out.len());
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 => out.insert(at, rng.random()),
            2 if !out.is_empty() => {
                let end = (at + rng.random_range(1..=8)).min(out.len());
                out.drain(at.min(end)..end);
            }
            3 if !out.is_empty() => {
                let start = rng.random_range(0..out.len());
                let end = (start + rng.random_range(1..=16)).min(out.len());
                let piece = out[start..end].to_vec();
                for _ in 0..rng.random_range(1..=8) {
                    out.splice(at..at, piece.iter().copied());
                }
            }
            4 | 5 if !words.is_empty() => {
                let word = &words[rng.random_range(0..words.len())];
                out.splice(at..at, word.iter().copied());
            }
            _ if !others.is_empty() => {
                let other = &others[rng.random_range(0..others.len())];
                let start = rng.random_range(0..=other.len());
                let end = rng.random_range(start..=other.len());
                out.splice(at..at, other[start..end].iter().copied());
            }
            _ => out.push(rng.random()),
        }
    }
    out
}

/// Runs `target` over the seeds and `rounds` mutations of them.
fn check(name: &str, dict: &str, rounds: usize, target: fn(&[u8])) {
    let seeds = seeds(name);
    let words = dictionary(dict);
    for seed in &seeds {
        target(seed);
    }
    let mut rng = StdRng::seed_from_u64(0x5157_4552);
    let mut input = seeds[0].clone();
    for round in 0..rounds {
        // Mostly walk on from the last input; sometimes restart from a seed.
        if round % 16 == 0 || input.len() > 1 << 16 {
            input = seeds[rng.random_range(0..seeds.len())].clone();
        }
        input = mutate(&mut rng, &input, &words, &seeds);
        let result = std::panic::catch_unwind(|| target(&input));
        if result.is_err() {
            let saved = std::env::temp_dir().join(format!("{name}-round-{round}"));
            std::fs::write(&saved, &input).unwrap();
            panic!(
                "{name} panicked on round {round}; the input is in {} (add it to \
                 fuzz/corpus/{name}/)",
                saved.display()
            );
        }
    }
}

#[test]
fn tickets_decode_or_fail_cleanly() {
    check(
        "fuzz_ticket",
        "flight_sql.dict",
        20_000,
        quiver_fuzz::ticket,
    );
}

#[test]
fn flight_sql_commands_decode_or_fail_cleanly() {
    check(
        "fuzz_flight_sql",
        "flight_sql.dict",
        20_000,
        quiver_fuzz::flight_sql,
    );
}

#[test]
fn sql_plans_or_fails_cleanly() {
    check("fuzz_sql", "sql.dict", 1_500, quiver_fuzz::sql);
}

#[test]
fn authorization_headers_are_read_or_refused_cleanly() {
    check("fuzz_auth", "flight_sql.dict", 20_000, quiver_fuzz::auth);
}

#[test]
fn do_put_parameters_bind_or_fail_cleanly() {
    check(
        "fuzz_do_put",
        "flight_sql.dict",
        10_000,
        quiver_fuzz::do_put,
    );
}

#[test]
fn the_seed_tickets_are_what_they_say() {
    // The seeds reach past the first check: a broken seed would leave the fuzzer
    // mutating errors.
    use quiver::flight::ticket::{Command, decode};
    let dir = fuzz_dir().join("corpus/fuzz_ticket");
    let query = decode(&std::fs::read(dir.join("query_ticket")).unwrap()).unwrap();
    assert!(
        matches!(query, Command::Query(ref t) if t.sql == "SELECT 1"),
        "{query:?}"
    );
    let statement = decode(&std::fs::read(dir.join("statement_query")).unwrap()).unwrap();
    assert!(matches!(statement, Command::FlightSql(_)), "{statement:?}");
    // The DoPut seed with one row binds a value of each parameter type.
    let one_row = std::fs::read(fuzz_dir().join("corpus/fuzz_do_put/one_row")).unwrap();
    let messages = quiver_fuzz::flight_data_messages(&one_row);
    let bound = futures::executor::block_on(quiver::flight::bound_parameters(
        futures::stream::iter(messages.into_iter().map(Ok)),
        &[None, None],
    ))
    .unwrap();
    assert_eq!(bound.map(|v| v.len()), Some(2));
}
