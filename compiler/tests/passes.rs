//! Golden tests of the fusion passes: each `tests/passes/*.q3c` file holds a pass name, an input graph in
//! the text form and the expected graph after the pass. `Q3C_BLESS=1 cargo test -p q3c-compiler` rewrites
//! the expectations after an intended change (review the diff).

use std::path::Path;

use q3c_compiler::pipeline::PASSES;
use q3c_ir::text::{parse, print};

const EXPECT: &str = "; expect:\n";

#[test]
fn every_pass_file_gives_its_expected_graph() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/passes");
    let bless = std::env::var("Q3C_BLESS").is_ok_and(|v| v == "1");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for path in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "q3c"))
    {
        let text = std::fs::read_to_string(path).unwrap();
        let name = path.display();
        let pass_name = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("; pass: "))
            .unwrap_or_else(|| panic!("{name}: first line must be '; pass: NAME'"));
        let pass = PASSES
            .iter()
            .find(|p| p.name == pass_name)
            .unwrap_or_else(|| panic!("{name}: unknown pass {pass_name}"));
        let (input, expected) = text.split_once(EXPECT).unwrap_or((&text, ""));
        let mut graph = parse(input).unwrap_or_else(|e| panic!("{name}: {e}"));
        q3c_ir::verify(&graph).unwrap_or_else(|e| panic!("{name}: input: {e}"));
        (pass.run)(&mut graph);
        q3c_ir::verify(&graph).unwrap_or_else(|e| panic!("{name}: after {pass_name}: {e}"));
        let got = print(&graph);
        if bless {
            std::fs::write(path, format!("{input}{EXPECT}{got}")).unwrap();
        } else {
            assert_eq!(
                got, expected,
                "{name}: graph after {pass_name} differs (Q3C_BLESS=1 to accept)"
            );
        }
    }
}
