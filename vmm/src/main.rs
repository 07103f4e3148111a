fn main() {
    let start_ns = vmm::clock::monotonic_ns();
    std::process::exit(vmm::cli::main(start_ns));
}
