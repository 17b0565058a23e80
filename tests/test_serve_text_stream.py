"""TextStream: token ids to printable text, checked against the tokenizer's own decode of the
whole sequence (Llama-3 tiktoken: emoji and accented letters span several byte tokens)."""

from __future__ import annotations

from zagreus.serve.engine import TextStream

TEXT = "Perché il 🐍 costa più? Ecco: <tool_call>\n{\"name\": \"f\"}\n</tool_call> fine"


def _pieces(tok, ids, **kwargs):
    stream = TextStream(tok, **kwargs)
    return stream, [stream.push(i) for i in ids]


def test_pieces_join_to_the_decoded_text(llama3_tokenizer):
    tok = llama3_tokenizer
    ids = tok.encode(TEXT)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are partial characters
    stream, pieces = _pieces(tok, ids, hold_tool_calls=False)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == TEXT == stream.finish() == tok.decode(ids)
    assert sum(1 for p in pieces if p) > 10  # it streams, not all at the end


def test_tool_call_is_withheld(llama3_tokenizer):
    tok = llama3_tokenizer
    stream, pieces = _pieces(tok, tok.encode(TEXT))
    assert "".join(pieces) == "Perché il 🐍 costa più? Ecco: "
    assert stream.finish() == TEXT  # the whole text stays available for parsing the call


def test_stop_string_across_tokens(llama3_tokenizer):
    tok = llama3_tokenizer
    ids = tok.encode(TEXT)
    stream, pieces = _pieces(tok, ids, stop=["costa più", "never"])
    assert stream.stopped
    assert "".join(pieces) == "Perché il 🐍 "
    assert stream.finish() == "Perché il 🐍 " and stream.flush() == ""
    # A prefix of a stop string that never completes is released at the end.
    stream, pieces = _pieces(tok, tok.encode("alpha beta gam"), stop=["gamma"], hold_tool_calls=False)
    assert "".join(pieces) == "alpha beta " and stream.flush() == "gam" and not stream.stopped
