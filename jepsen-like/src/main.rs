//! jepsen-like: the black-box fault-injection harness for cairn. Its content comes with its own issue.

fn main() {
    eprintln!("jepsen-like: not built yet; see the jepsen-like issue");
    std::process::exit(2);
}
