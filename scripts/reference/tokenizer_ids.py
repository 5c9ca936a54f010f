"""Reference token ids for tests/tokenizer.rs.

Run once with the pure-Python (slow) BertTokenizer of Hugging Face transformers 4.46.3, an
implementation independent of the Rust `tokenizers` crate:

    python -m venv /tmp/ref && /tmp/ref/bin/pip install transformers==4.46.3
    /tmp/ref/bin/python scripts/reference/tokenizer_ids.py ../shared/data/vocab/bert-base-cased-vocab.txt

The sentences are real IU-CXR report sentences (indiana_reports.csv; uid and section in the test).
"""
import json
import sys

from transformers import BertTokenizer

SENTENCES = [
    "Visualized XXXX of the chest XXXX are within normal limits.",
    "Prominent left epicardial fat XXXX, no focal alveolar consolidation, no definite pleural effusion seen.",
    "There is abnormal separation of the right XXXX XXXX.",
    "Calcified hilar lymph XXXX.",
    "If none are available, recommend short-term XXXX in 3 to 4 months.",
    "Pacemaker generator overlying the left chest in stable position with 2 leads terminating in the right atrium and right ventricle in stable position.",
    "There are deformities of the left lateral 7th and 8th ribs possibly healing or old fractures.",
    "There is an 8 mm calcified nodule in the left midlung.",
    "Cardiomegaly and small bilateral pleural effusions 2.",
    "1 cm nodule within the lung base, seen only on the lateral view.",
    "There is a XXXX 7 XXXX nodular density at the left lung base.",
    "Lungs are clear without focal consolidation, pneumothorax, or pleural effusion.",
    "Accounting for technical factors heart size XXXX within normal limits, heavily calcified and mildly tortuous aorta.",
    "No alveolar consolidation, no findings of pleural effusion or pulmonary edema.",
    "No focal consolidation, pneumothorax or large pleural effusion.",
    "No airspace disease, effusion or noncalcified nodule.",
    "Left paraspinal/retrocrural adenopathy.",
    "Low lung volumes without focal consolidation, pneumothorax or large pleural effusion.",
    "Heart size and vascularity normal.",
    "Several bilateral healing rib fractures, XXXX pathologic fracture.",
    "Costophrenic XXXX are blunted.",
    "No acute cardiopulmonary disease.",
    "No evidence of active disease.",
    "There is no pleural effusion or pneumothorax.",
    "No focal airspace disease.",
]

tok = BertTokenizer(vocab_file=sys.argv[1], do_lower_case=False)
for s in SENTENCES:
    print(json.dumps({"text": s, "ids": tok.encode(s, add_special_tokens=True)}))
