//! The CRD files in the chart are exactly what the types generate.

#[test]
fn chart_crds_match_the_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../chart/hoard/crds");
    let files = hoard_api::crd::rendered().expect("render CRDs");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("chart/hoard/crds exists")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".hoard.dev.yaml"))
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    expected.sort();
    assert_eq!(on_disk, expected, "CRD files differ; run `cargo run -p hoard-api --bin hoard-crdgen`");
    for (name, body) in files {
        let current = std::fs::read_to_string(dir.join(&name)).expect("read CRD file");
        assert!(current == body, "{name} is stale; run `cargo run -p hoard-api --bin hoard-crdgen`");
    }
}
