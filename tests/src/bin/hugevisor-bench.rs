//! `hugevisor-bench`: the benchmark harness (docs/benchmarks.md). It runs a `hugevisor`
//! binary from outside — by default the one built next to it, or `--hugevisor PATH`.

fn main() {
    std::process::exit(tests::bench::main());
}
