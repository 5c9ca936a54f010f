//! The WordPiece tokenizer built from BERT-base-cased's vocab.txt gives the ids of the reference
//! BERT tokenizer on real IU-CXR report sentences.
//!
//! Reference ids: Hugging Face transformers 4.46.3, pure-Python `BertTokenizer(vocab_file=...,
//! do_lower_case=False).encode(text)`, an implementation independent of the `tokenizers` crate.
//! Regenerate with scripts/reference/tokenizer_ids.py (its docstring has the exact commands).

mod common;

use cxrgen::model::tokenizer::TextTokenizer;

const CASES: &[(&str, &[u32])] = &[
    (
        "Visualized XXXX of the chest XXXX are within normal limits.",
        &[101,12071,2200,161,3190,3190,3190,1104,1103,2229,161,3190,3190,3190,1132,1439,2999,6263,119,102],
    ),
    (
        "Prominent left epicardial fat XXXX, no focal alveolar consolidation, no definite pleural effusion seen.",
        &[101,5096,9685,2227,1286,11431,2881,2916,7930,161,3190,3190,3190,117,1185,17811,2393,2707,21459,20994,117,1185,16428,185,1513,12602,174,3101,17268,1562,119,102],
    ),
    (
        "There is abnormal separation of the right XXXX XXXX.",
        &[101,1247,1110,22832,8865,1104,1103,1268,161,3190,3190,3190,161,3190,3190,3190,119,102],
    ),
    (
        "Calcified hilar lymph XXXX.",
        &[101,11917,6617,8971,20844,5815,181,25698,161,3190,3190,3190,119,102],
    ),
    (
        "If none are available, recommend short-term XXXX in 3 to 4 months.",
        &[101,1409,3839,1132,1907,117,18029,1603,118,1858,161,3190,3190,3190,1107,124,1106,125,1808,119,102],
    ),
    (
        "Pacemaker generator overlying the left chest in stable position with 2 leads terminating in the right atrium and right ventricle in stable position.",
        &[101,24622,8085,14622,16201,1158,1103,1286,2229,1107,6111,1700,1114,123,4501,26702,1107,1103,1268,1120,11077,1105,1268,21828,4907,1513,1107,6111,1700,119,102],
    ),
    (
        "There are deformities of the left lateral 7th and 8th ribs possibly healing or old fractures.",
        &[101,1247,1132,19353,24211,4233,1104,1103,1286,11937,4766,1105,5192,10346,3566,9523,1137,1385,22869,1116,119,102],
    ),
    (
        "There is an 8 mm calcified nodule in the left midlung.",
        &[101,1247,1110,1126,129,2608,11019,1233,6617,8971,6873,8722,1107,1103,1286,2286,24356,119,102],
    ),
    (
        "Cardiomegaly and small bilateral pleural effusions 2.",
        &[101,10103,2660,3263,6997,1183,1105,1353,20557,185,1513,12602,174,3101,27262,123,119,102],
    ),
    (
        "1 cm nodule within the lung base, seen only on the lateral view.",
        &[101,122,3975,6873,8722,1439,1103,13093,2259,117,1562,1178,1113,1103,11937,2458,119,102],
    ),
    (
        "There is a XXXX 7 XXXX nodular density at the left lung base.",
        &[101,1247,1110,170,161,3190,3190,3190,128,161,3190,3190,3190,6873,5552,3476,1120,1103,1286,13093,2259,119,102],
    ),
    (
        "Lungs are clear without focal consolidation, pneumothorax, or pleural effusion.",
        &[101,14557,2118,1116,1132,2330,1443,17811,20994,117,185,1673,1818,12858,25632,117,1137,185,1513,12602,174,3101,17268,119,102],
    ),
    (
        "Accounting for technical factors heart size XXXX within normal limits, heavily calcified and mildly tortuous aorta.",
        &[101,23693,1111,4301,5320,1762,2060,161,3190,3190,3190,1439,2999,6263,117,3777,11019,1233,6617,8971,1105,21461,1106,3740,8163,170,12148,1161,119,102],
    ),
    (
        "No alveolar consolidation, no findings of pleural effusion or pulmonary edema.",
        &[101,1302,2393,2707,21459,20994,117,1185,9505,1104,185,1513,12602,174,3101,17268,1137,26600,5048,14494,119,102],
    ),
    (
        "No focal consolidation, pneumothorax or large pleural effusion.",
        &[101,1302,17811,20994,117,185,1673,1818,12858,25632,1137,1415,185,1513,12602,174,3101,17268,119,102],
    ),
    (
        "No airspace disease, effusion or noncalcified nodule.",
        &[101,1302,15692,12204,3653,117,174,3101,17268,1137,1664,7867,6617,8971,6873,8722,119,102],
    ),
    (
        "Left paraspinal/retrocrural adenopathy.",
        &[101,8123,18311,20080,14196,120,1231,8005,1665,5082,4412,8050,26601,12233,119,102],
    ),
    (
        "Low lung volumes without focal consolidation, pneumothorax or large pleural effusion.",
        &[101,8274,13093,6357,1443,17811,20994,117,185,1673,1818,12858,25632,1137,1415,185,1513,12602,174,3101,17268,119,102],
    ),
    (
        "Heart size and vascularity normal.",
        &[101,4641,2060,1105,26557,1785,2999,119,102],
    ),
    (
        "Several bilateral healing rib fractures, XXXX pathologic fracture.",
        &[101,3728,20557,9523,23298,22869,1116,117,161,3190,3190,3190,3507,12805,11007,22869,119,102],
    ),
    (
        "Costophrenic XXXX are blunted.",
        &[101,3291,26645,22165,1596,161,3190,3190,3190,1132,20294,1174,119,102],
    ),
    (
        "No acute cardiopulmonary disease.",
        &[101,1302,12104,3621,2660,16091,13505,7637,1616,3653,119,102],
    ),
    (
        "No evidence of active disease.",
        &[101,1302,2554,1104,2327,3653,119,102],
    ),
    (
        "There is no pleural effusion or pneumothorax.",
        &[101,1247,1110,1185,185,1513,12602,174,3101,17268,1137,185,1673,1818,12858,25632,119,102],
    ),
    (
        "No focal airspace disease.",
        &[101,1302,17811,15692,12204,3653,119,102],
    ),
];

#[test]
fn bert_base_cased_ids_match_reference() {
    let Some(vocab) = common::shared_file("data/vocab/bert-base-cased-vocab.txt") else {
        return;
    };
    let tok = TextTokenizer::from_vocab_file(&vocab, false, 256).unwrap();
    assert_eq!(tok.vocab_size(), 28_996);
    assert!(CASES.len() >= 20);
    for (text, want) in CASES {
        let (got, truncated) = tok.encode(text).unwrap();
        assert!(!truncated);
        assert_eq!(&got, want, "{text}");
    }
}

#[test]
fn truncation_keeps_the_limit_and_the_final_sep() {
    let Some(vocab) = common::shared_file("data/vocab/bert-base-cased-vocab.txt") else {
        return;
    };
    let tok = TextTokenizer::from_vocab_file(&vocab, false, 10).unwrap();
    let (text, full) = CASES[5];
    let (got, truncated) = tok.encode(text).unwrap();
    assert!(truncated);
    assert_eq!(got.len(), 10);
    assert_eq!(&got[..9], &full[..9]);
    assert_eq!(got[9], 102, "[SEP]");
}
