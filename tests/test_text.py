"""Text sources and packing into contexts."""

import json
from itertools import islice

import numpy as np
import pytest

from saelab.config import TextConfig
from saelab.errors import TextSourceError
from saelab.text import SpecialTokens, batch_contexts, embedded_documents, iter_documents, pack_contexts


def test_embedded_corpus_is_real_prose_and_large_enough(minilm):
    docs = list(embedded_documents())
    assert docs == list(embedded_documents())  # deterministic
    n_tokens = sum(map(len, minilm.tokenizer(docs, add_special_tokens=False)["input_ids"]))
    assert n_tokens >= 300_000
    assert any("Return" in d for d in docs[:200])


def test_encoder_contexts_are_framed_with_cls_and_sep(minilm):
    special = SpecialTokens.for_tokenizer(minilm.tokenizer, encoder=True)
    docs = ["alpha beta gamma", "", "delta epsilon"]
    ((tokens, doc_id),) = list(pack_contexts(docs * 4, minilm.tokenizer, special, context_length=16))[:1]
    tok = minilm.tokenizer
    assert tokens[0] == tok.cls_token_id and tokens[-1] == tok.sep_token_id and len(tokens) == 16
    assert doc_id[0] == -1 and doc_id[-1] == -1
    body = tok.convert_ids_to_tokens(tokens[1:-1].tolist())
    assert body[:4] == ["alpha", "beta", "gamma", "[SEP]"]
    assert doc_id[1:5].tolist() == [0, 0, 0, 0] and doc_id[5] == 2  # the empty document 1 adds nothing


def test_decoder_contexts_start_with_bos_and_separate_documents_with_eos(decoder):
    tok = decoder.tokenizer
    special = SpecialTokens.for_tokenizer(tok, encoder=False)
    docs = ["one two three", "four five"] * 20
    contexts = list(pack_contexts(docs, tok, special, context_length=8))
    flat = np.concatenate([t[1:] for t, _ in contexts])
    assert all(t[0] == tok.bos_token_id for t, _ in contexts)
    expected = np.concatenate([tok.encode(d, add_special_tokens=False) + [tok.eos_token_id] for d in docs])
    assert np.array_equal(flat, expected[: len(flat)])  # packing keeps every token in order
    batch = next(batch_contexts(iter(contexts), 3, special))
    assert batch.tokens.shape == (3, 8) and batch.position[0].tolist() == list(range(8))
    assert batch.special[:, 0].all() and (batch.special == np.isin(batch.tokens, [tok.eos_token_id])).all()


def test_local_files_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph here.\n\nsecond paragraph.\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(3)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p one", "p two"]}), tmp_path / "c.parquet")
    txt = list(iter_documents(TextConfig(source="files", path=str(tmp_path / "a.txt"))))
    assert [t.strip() for t in txt] == ["first paragraph here.", "second paragraph."]
    jsonl = list(iter_documents(TextConfig(source="files", path=str(tmp_path / "b.jsonl"), text_column="body")))
    assert jsonl == ["doc 0", "doc 1", "doc 2"]
    assert list(iter_documents(TextConfig(source="files", path=str(tmp_path / "c.parquet")))) == ["p one", "p two"]
    with pytest.raises(TextSourceError, match="no column 'text'"):
        list(iter_documents(TextConfig(source="files", path=str(tmp_path / "b.jsonl"))))
    with pytest.raises(TextSourceError, match="mixes file types"):
        list(iter_documents(TextConfig(source="files", path=str(tmp_path))))


def test_folder_of_text_files_and_max_documents(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"file {i}")
    cfg = TextConfig(source="files", path=str(tmp_path), max_documents=2)
    assert list(iter_documents(cfg)) == ["file 0", "file 1"]
    assert len(list(islice(iter_documents(TextConfig()), 5))) == 5


def test_missing_text_path_is_refused():
    cfg = TextConfig(source="files", path="/nonexistent/corpus.txt")  # configs never look at the filesystem
    with pytest.raises(ValueError, match="no such file or folder"):
        iter_documents(cfg)


def test_hf_source_streams_a_dataset_repository(tmp_path):
    """A local folder stands in for a hub repository: the same `load_dataset(..., streaming=True)` path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"content": [f"row {i}" for i in range(5)]}), tmp_path / "data" / "train-00000.parquet")
    cfg = TextConfig(source="hf", path=str(tmp_path), split="train", text_column="content", max_documents=3)
    assert list(iter_documents(cfg)) == ["row 0", "row 1", "row 2"]
    with pytest.raises(ValueError, match="needs text.path"):
        TextConfig(source="hf")


def test_text_files_that_are_not_utf8_are_named(tmp_path):
    (tmp_path / "a.txt").write_text("fine text\n")
    (tmp_path / "b.txt").write_bytes("na\xefve\n".encode("latin-1"))
    with pytest.raises(TextSourceError, match=r"b\.txt is not UTF-8 text .*iconv"):
        list(iter_documents(TextConfig(source="files", path=str(tmp_path))))
