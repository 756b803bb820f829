//! The README shows what `cargo run --example demo` prints: the demo's real output, line for
//! line (the keys are random, so their first characters are compared as `····`).

use std::sync::{Arc, Mutex};

#[path = "../../examples/demo.rs"]
#[allow(dead_code, unreachable_pub)]
mod demo;

/// The README's `text` block that follows the `cargo run --example demo` command.
fn readme_transcript() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let from = readme.find("<!-- demo transcript -->").expect("the README marks the demo's transcript");
    let block = &readme[from..];
    let start = block.find("```text\n").expect("a text block after the marker") + "```text\n".len();
    let end = block[start..].find("```").expect("the block ends") + start;
    block[start..end].lines().map(str::to_owned).collect()
}

/// A transcript line with any key shown as `····…`.
fn without_keys(line: &str) -> String {
    match line.find("Idempotency-Key: ") {
        Some(at) => {
            let key = at + "Idempotency-Key: ".len();
            let rest = &line[key..];
            let shown = rest.find('…').expect("a key is shown shortened");
            format!("{}····{}", &line[..key], &rest[shown..])
        }
        None => line.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_shows_the_demos_real_output() {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let say: demo::Say = Arc::new({
        let lines = lines.clone();
        move |line| lines.lock().unwrap().push(line)
    });
    demo::run(say).await.expect("the demo runs to its end");
    let printed: Vec<String> = lines.lock().unwrap().iter().map(|line| without_keys(line)).collect();
    let readme: Vec<String> = readme_transcript().iter().map(|line| without_keys(line)).collect();
    assert_eq!(readme, printed, "README.md's demo transcript differs from what the demo prints");
}
