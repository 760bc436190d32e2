"""Custom labels (saelab.absorption.vocab): from a function or a table, and the errors that name the fix."""

from __future__ import annotations

import json

import pytest

from saelab.absorption import (
    AbsorptionError,
    AbsorptionSettings,
    PromptStyle,
    absorption_result,
    labelled_vocabulary,
    load_label_table,
    probe_data,
)
from saelab.dictionaries import SAE, SAEConfig

FAST = AbsorptionSettings(probe_batch_size=1024)  # the metric's known answers do not depend on the probe's batch


def test_custom_labels_from_a_function_or_a_table(decoder, bpe_tokenizer, tmp_path):
    vowel = labelled_vocabulary(
        bpe_tokenizer,
        lambda t: None if not t.strip().isalpha() else ("vowel" if t.strip()[0].lower() in "aeiou" else "consonant"),
    )
    assert {w.label for w in vowel} == {"vowel", "consonant"}
    table = {w.text: w.label for w in vowel[:60]}
    (tmp_path / "labels.json").write_text(json.dumps(table))
    with (tmp_path / "labels.csv").open("w") as f:
        f.writelines(f"{k},{v}\n" for k, v in table.items() if "," not in k)
    assert load_label_table(tmp_path / "labels.json") == table == load_label_table(tmp_path / "labels.csv")
    words = labelled_vocabulary(bpe_tokenizer, table)
    assert [(w.token, w.label) for w in words] == [(w.token, w.label) for w in vowel[:60]]
    data = probe_data(decoder, "blocks.1.hook_resid_post", table, style=PromptStyle("{word} is a", 2), s=FAST)
    assert data.classes == ["consonant", "vowel"]
    sae = SAE.from_config(SAEConfig(d_in=64, d_sae=128, k=4))
    result = absorption_result(sae, data, "blocks.1.hook_resid_post", variant="random", s=FAST, task="vowels")
    assert [lab.label for lab in result.labels] == ["consonant", "vowel"] and result.l0 == 4.0


def test_label_errors_name_the_fix(bpe_tokenizer, tmp_path):
    with pytest.raises(AbsorptionError, match="not single tokens of this tokenizer"):
        labelled_vocabulary(bpe_tokenizer, {"notasingletokenatall": "x"})
    (tmp_path / "bad.csv").write_text("a,b,c\n")
    with pytest.raises(AbsorptionError, match="exactly two columns"):
        load_label_table(tmp_path / "bad.csv")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(AbsorptionError, match="JSON object"):
        load_label_table(tmp_path / "bad.json")
    with pytest.raises(AbsorptionError, match="no label table"):
        load_label_table(tmp_path / "missing.csv")
