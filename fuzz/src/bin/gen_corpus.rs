//! Writes the seed corpora: `gen_corpus DIR` creates `DIR/<target>/<seed>` for every fuzz target.
//! Seeds are small valid objects built with hoard-core's own types (see `hoard_fuzz::seeds`);
//! every seed is checked (`hoard_fuzz::check_seed`) before it is written.
//!
//! `cargo fuzz build` builds it with the targets, so it needs no separate, uninstrumented compile
//! of hoard-core. That also means it carries coverage instrumentation, whose hooks only libFuzzer
//! defines (without ASan nothing else does), so it is shaped like a fuzz target: libFuzzer's
//! `main` runs the `init` block below, which does the work and exits before any fuzzing starts.
#![no_main]
// The `init` block exits, so the code `fuzz_target!` puts after it is unreachable on purpose.
#![allow(unreachable_code)]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;

fn write_seeds(dir: PathBuf) -> std::io::Result<()> {
    let mut total = 0usize;
    for t in hoard_fuzz::targets() {
        let d = dir.join(t);
        std::fs::create_dir_all(&d)?;
        for (name, bytes) in hoard_fuzz::seeds(t) {
            if let Err(e) = hoard_fuzz::check_seed(t, &bytes) {
                eprintln!("gen_corpus: seed {t}/{name} is not what the target expects: {e}");
                std::process::exit(1);
            }
            total += bytes.len();
            std::fs::write(d.join(name), bytes)?;
        }
    }
    eprintln!("gen_corpus: {total} bytes of seeds in {}", dir.display());
    Ok(())
}

fuzz_target!(
    init: {
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        let [dir] = args.as_slice() else {
            eprintln!("usage: gen_corpus DIR");
            std::process::exit(2);
        };
        if let Err(e) = write_seeds(PathBuf::from(dir)) {
            eprintln!("gen_corpus: {e}");
            std::process::exit(1);
        }
        std::process::exit(0);
    },
    |_data: &[u8]| {}
);
