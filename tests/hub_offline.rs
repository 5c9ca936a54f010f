//! Offline, a hub id that is not in the cache fails with a message that says what to download and
//! where to put it. (One test in this binary: it sets process environment variables.)

#[test]
fn offline_without_cache_says_what_to_download_and_where() {
    let cache = std::env::temp_dir().join(format!("cxrgen-empty-hf-home-{}", std::process::id()));
    std::env::set_var("HF_HOME", &cache);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let err = cxrgen::model::text::BertFiles::locate("dmis-lab/biobert-base-cased-v1.1")
        .unwrap_err()
        .to_string();
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    assert!(
        err.contains("config.json, vocab.txt and pytorch_model.bin"),
        "{err}"
    );
    assert!(
        err.contains("https://huggingface.co/dmis-lab/biobert-base-cased-v1.1"),
        "{err}"
    );
    assert!(
        err.contains("models--dmis-lab--biobert-base-cased-v1.1"),
        "{err}"
    );
}
