fn main() {
    let start_ns = guest_image::clock::monotonic_ns();
    std::process::exit(vmm::cli::main(start_ns));
}
