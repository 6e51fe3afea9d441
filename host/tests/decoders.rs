//! Every decoder of outside bytes answers any byte string with a value or
//! an error, never a panic: random bytes, and valid inputs mutated (the
//! same surfaces the fuzz targets in `fuzz/` drive for hours). The seed
//! corpus committed under `fuzz/seeds` is checked to be current.

use std::path::PathBuf;

use ferry_host::decoders::{ALL, Decoded, Decoder, seeds};
use proptest::prelude::*;

fn decoder(target: &str) -> Decoder {
    ALL.iter()
        .find(|(name, _)| *name == target)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no decoder named {target}"))
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds")
}

#[test]
fn every_seed_is_accepted_by_its_decoder() {
    let seeds = seeds();
    for (name, _) in ALL {
        assert!(
            seeds.iter().any(|(t, _, _)| t == name),
            "decoder {name} has no seed"
        );
    }
    for (target, name, bytes) in &seeds {
        assert_eq!(
            decoder(target)(bytes),
            Decoded::Accepted,
            "seed {target}/{name}"
        );
    }
}

/// Every seed has its file in the committed corpus, and every committed
/// file is still accepted (a format change that makes them stale fails
/// here). Set FERRY_WRITE_SEEDS=1 to (re)write the corpus.
#[test]
fn committed_seed_corpus_is_current() {
    let write = std::env::var_os("FERRY_WRITE_SEEDS").is_some();
    let hint = "run FERRY_WRITE_SEEDS=1 cargo test -p ferry-host --test decoders";
    for (target, name, bytes) in seeds() {
        let path = corpus_dir().join(target).join(&name);
        // Rewrite only what is missing or stale (a certificate differs on
        // each run, so a valid one stays).
        let stale = std::fs::read(&path).map_or(true, |b| decoder(target)(&b) != Decoded::Accepted);
        if write && stale {
            std::fs::create_dir_all(path.parent().expect("a folder")).expect("corpus folder");
            std::fs::write(&path, &bytes).expect("seed written");
        }
        assert!(path.exists(), "{} is missing; {hint}", path.display());
    }
    let mut checked = 0;
    for (target, decode) in ALL {
        let dir = corpus_dir().join(target);
        for entry in std::fs::read_dir(&dir).expect("corpus folder") {
            let path = entry.expect("entry").path();
            let bytes = std::fs::read(&path).expect("seed");
            assert_eq!(
                decode(&bytes),
                Decoded::Accepted,
                "{} is no longer accepted; {hint}",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= seeds().len(), "only {checked} corpus files");
}

/// A small deterministic generator for the mutation walk.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).expect("below n")
    }

    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(bytes.len());
        match rng.below(5) {
            0 if !bytes.is_empty() => bytes[at] ^= 1 << rng.below(8),
            1 if !bytes.is_empty() => bytes[at] = rng.byte(),
            2 => bytes.truncate(at),
            3 => bytes.insert(at, rng.byte()),
            _ if bytes.len() >= 4 => {
                let word = [0xff, 0xff, 0xff, 0x7f];
                let at = at.min(bytes.len() - 4);
                bytes[at..at + 4].copy_from_slice(&word);
            }
            _ => {}
        }
    }
    bytes
}

#[test]
fn mutated_seeds_decode_or_are_refused() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut accepted_by = Vec::new();
    for (target, name, seed) in seeds() {
        let decode = decoder(target);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..2000 {
            match decode(&mutate(&mut rng, &seed)) {
                Decoded::Accepted => accepted += 1,
                Decoded::Refused => refused += 1,
            }
        }
        // The walk must reach the checks, or it is not testing them.
        assert!(refused > 0, "{target}/{name}: no mutation was refused");
        accepted_by.push((target, accepted));
    }
    // Some mutations of each decoder's seeds must still be valid: the walk
    // then also reaches what runs after decoding (round trips, batches).
    for (target, _) in ALL {
        let accepted: u32 = accepted_by
            .iter()
            .filter(|(t, _)| t == target)
            .map(|(_, n)| n)
            .sum();
        assert!(accepted > 0, "{target}: no mutation was accepted");
    }
}

proptest! {
    #[test]
    fn any_bytes_decode_or_are_refused(
        which in 0..ALL.len(),
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let (_, decode) = ALL[which];
        // Random bytes are almost never a valid archive; the property is
        // that the decoder returns at all (a panic fails the test).
        let _ = decode(&bytes);
    }
}
