//! Tokenization of the real models against llama.cpp's, on varied text: code, digits,
//! CJK, Cyrillic, Arabic and Devanagari scripts, emoji (with joiners and flags),
//! whitespace runs, accents, URLs and special tokens written in the text. The ids
//! come from `llama-tokenize` (see the fixture's `source`). Without a model file the
//! test says SKIPPED and passes.

use std::path::PathBuf;

use strata_model::{ModelFile, Tokenizer};

fn check(model: Option<PathBuf>, name: &str) {
    let Some(path) = model else { return };
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/llama_cpp_tokens.json")).expect("the fixture is JSON");
    let tokenizer = Tokenizer::from_gguf(ModelFile::open(&path).unwrap().metadata()).unwrap();
    let cases = fixture["models"][name].as_array().expect("the fixture has the model");
    assert!(cases.len() >= 15);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(tokenizer.encode(text).unwrap(), want, "{name}: {text:?}");
    }
}

#[test]
fn gemma3_tokenizes_as_llama_cpp_does() {
    check(strata_model::synthetic::real_gemma_model(), "gemma");
}

#[test]
fn smollm2_tokenizes_as_llama_cpp_does() {
    check(strata_model::synthetic::real_test_model(), "smollm2");
}
