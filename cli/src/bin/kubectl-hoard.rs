//! `kubectl-hoard`: the kubectl plugin (`kubectl hoard …`). See [`hoard::kubectl`].

fn main() -> std::process::ExitCode {
    hoard::kubectl::main()
}
