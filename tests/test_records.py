"""Record files: validation with line numbers, phases, truncation."""

from pathlib import Path

import pytest

from featurewatch.errors import RecordError
from featurewatch.records import iter_records, load_records, pad_right, parse_record, render


def write(tmp_path: Path, *lines: str) -> Path:
    p = tmp_path / "in.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_valid_records_keep_ids_and_pass_through_extra_keys(tmp_path: Path) -> None:
    p = write(tmp_path, '{"id": "a", "text": "hello", "label": 1, "source": "x"}',
              "", '{"messages": [{"role": "user", "content": "hi"}]}')
    records = load_records(p)
    assert [r.id for r in records] == ["a", "line-3"]
    assert records[0].extra == {"label": 1, "source": "x"}
    assert records[1].line == 3


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"id": "x"}', "exactly one of 'text'"),
    ('{"text": "a", "messages": []}', "exactly one of 'text'"),
    ('{"text": ""}', "non-empty string"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages\\[0\\]"),
])
def test_malformed_line_is_an_error_naming_its_line_number(tmp_path: Path, line: str, message: str) -> None:
    p = write(tmp_path, '{"text": "fine"}', line)
    with pytest.raises(RecordError, match=message) as info:
        load_records(p)
    assert info.value.line == 2
    assert f"{p}:2:" in str(info.value)


def test_skip_invalid_reports_every_skipped_line(tmp_path: Path) -> None:
    p = write(tmp_path, '{"text": "a"}', "oops", '{"text": "b"}', "{}")
    skipped: list[RecordError] = []
    records = list(iter_records(p, skip_invalid=True, on_skip=skipped.append))
    assert [r.text for r in records] == ["a", "b"]
    assert [e.line for e in skipped] == [2, 4]


def test_missing_file_is_a_record_error(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="cannot open"):
        load_records(tmp_path / "nope.jsonl")


class CharTokenizer:
    """Characters as tokens; a chat template that wraps turns in brackets."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages: list, tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        out = "".join(f"[{m['role'][0]}]{m['content']}" for m in messages)
        return out + ("[a]" if add_generation_prompt else "")


def test_render_splits_prompt_and_completion_at_the_assistant_reply() -> None:
    rec = parse_record({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                       line=1)
    r = render(rec, CharTokenizer())
    assert "".join(map(chr, r.ids[:r.n_prompt])) == "[u]hi[a]"
    assert "".join(map(chr, r.ids[r.n_prompt:])) == "yo"
    assert r.phase_of(0) == "prompt" and r.phase_of(len(r.ids) - 1) == "completion"


def test_render_text_is_all_prompt_and_truncation_keeps_the_reply() -> None:
    text = render(parse_record({"text": "abcdef"}, line=1), CharTokenizer(), max_tokens=4)
    assert text.n_prompt == 4 and len(text.ids) == 4
    chat = parse_record({"messages": [{"role": "user", "content": "x" * 50},
                                      {"role": "assistant", "content": "reply"}]}, line=1)
    r = render(chat, CharTokenizer(), max_tokens=12)
    assert len(r.ids) == 12
    assert "".join(map(chr, r.ids[r.n_prompt:])) == "reply"


def test_pad_right_masks_the_padding() -> None:
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# --- hardening (issue 7): bad bytes, deep nesting and chats without a prompt are errors of their line ---

def test_non_utf8_bytes_are_an_error_naming_the_line_and_can_be_skipped(tmp_path: Path) -> None:
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "caf\xe9"}\n{"id": "c", "text": "ok"}\n')
    with pytest.raises(RecordError, match=r"in\.jsonl:2: not UTF-8 text \(byte 0xe9"):
        load_records(p)
    skipped: list[RecordError] = []
    assert [r.id for r in iter_records(p, skip_invalid=True, on_skip=skipped.append)] == ["a", "c"]
    assert [e.line for e in skipped] == [2]


def test_a_binary_file_is_a_record_error_not_a_decode_traceback(tmp_path: Path) -> None:
    p = tmp_path / "image.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(RecordError, match=r"image\.png:1: not UTF-8 text \(byte 0x89"):
        load_records(p)


def test_deeply_nested_json_is_a_record_error_naming_the_line(tmp_path: Path) -> None:
    p = write(tmp_path, '{"text": "fine"}', '{"text": "x", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(RecordError, match=r"in\.jsonl:2: JSON nested too deeply"):
        load_records(p)
    skipped: list[RecordError] = []
    assert len(list(iter_records(p, skip_invalid=True, on_skip=skipped.append))) == 1 and len(skipped) == 1


def test_a_byte_order_mark_on_the_first_line_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "in.jsonl"
    p.write_bytes('\ufeff{"id": "a", "text": "hello"}\n'.encode())
    assert [r.id for r in load_records(p)] == ["a"]


@pytest.mark.parametrize("messages, message", [
    ([{"role": "assistant", "content": "Hello!"}], "needs a system or user message before the assistant"),
    ([{"role": "bogus", "content": "hi"}], "role 'bogus'; valid roles: system, user, assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "User", "content": "x"}], r"messages\[1\] has role 'User'"),
    ([], "non-empty list"),
    ([{"role": "user", "content": 3}], "string 'content'"),
    (["hi"], r"messages\[0\] must be an object"),
])
def test_bad_chats_are_rejected_at_validation_naming_the_line(tmp_path: Path, messages: list, message: str) -> None:
    import json

    p = write(tmp_path, '{"text": "first"}', json.dumps({"id": "x", "messages": messages}))
    with pytest.raises(RecordError, match=r"in\.jsonl:2: .*" + message):
        load_records(p)


def test_a_directory_is_a_record_error(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="is a directory"):
        load_records(tmp_path)


def test_json_lines_is_the_one_reader_of_jsonl_lines_records_and_score_files() -> None:
    """records_from_lines and the page's score files read lines through json_lines: line numbers, blank lines,
    a BOM on the first line, errors with their reason apart from the place; strict refuses non-finite numbers."""
    from featurewatch.records import json_lines, records_from_lines

    lines = ['\ufeff{"a": 1}', "", '{"a": 2.5}']
    assert list(json_lines(lines, lambda obj, n: (n, obj["a"]), path="x")) == [(1, 1), (3, 2.5)]
    assert [r.id for r in records_from_lines([b'{"text": "hi"}\n', b"\n", b'{"id": "b", "text": "yo"}\n'],
                                             path="mem")] == ["line-1", "b"]
    assert list(json_lines(['{"a": NaN}'], lambda obj, n: obj, path="x")) == [{"a": pytest.approx(float("nan"),
                                                                                                  nan_ok=True)}]
    for bad in ('{"a": NaN}', '{"a": 1e999}', '{"a": -Infinity}'):
        with pytest.raises(RecordError, match="a bad number") as info:
            list(json_lines(["{}", bad], lambda obj, n: obj, path="scores", strict=True))
        assert info.value.line == 2 and str(info.value).startswith("scores:2: ")
        assert info.value.reason.startswith("a bad number")
    with pytest.raises(RecordError, match=r"x:1: invalid JSON \(Exceeds the limit"):
        list(json_lines(['{"a": ' + "9" * 5000 + "}"], lambda obj, n: obj, path="x"))
