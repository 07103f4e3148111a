//! Writes the destination target's seed inputs (a pre-copy and a post-copy that succeed)
//! into the directory given, e.g. `cargo fuzz run --bin seeds`-less:
//! `cargo +nightly run --manifest-path fuzz/Cargo.toml --bin seeds -- fuzz/corpus/destination`.

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "corpus/destination".into());
    std::fs::create_dir_all(&dir).expect("creating the corpus directory");
    for (name, bytes) in migration::fuzzing::seeds() {
        let path = std::path::Path::new(&dir).join(format!("seed-{name}"));
        std::fs::write(&path, bytes).expect("writing a seed");
        println!("{}", path.display());
    }
}
