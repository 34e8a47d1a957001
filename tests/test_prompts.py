"""Prompt sources: the bundled list and local files through `datasets`."""

from __future__ import annotations

import json

import pytest

from optsearch.measure.prompts import PromptError, builtin_prompts, load_prompts


def test_builtin_list_is_large_and_unique():
    prompts = builtin_prompts()
    assert len(prompts) >= 64 and len(set(prompts)) == len(prompts)


def test_first_prompts_in_order_and_seeded_shuffle():
    assert load_prompts("builtin", 3) == builtin_prompts()[:3]
    shuffled = load_prompts("builtin", 5, seed=1, shuffle=True)
    assert shuffled == load_prompts("builtin", 5, seed=1, shuffle=True)
    assert shuffled != load_prompts("builtin", 5, seed=2, shuffle=True)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_local_files(tmp_path, suffix):
    prompts = ["a cat on a mat", "a dog in the snow", "a red kite"]
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(prompts) + "\n\n")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n"
                                for i, p in enumerate(prompts)))
    elif suffix == ".csv":
        path.write_text("id,caption\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(prompts)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": prompts}), path)
    assert load_prompts(str(path), 3) == prompts


def test_too_many_prompts_is_a_clear_error():
    with pytest.raises(PromptError, match="num_samples=500 but source 'builtin' has only"):
        load_prompts("builtin", 500)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(PromptError, match="is empty"):
        load_prompts(str(empty), 1)
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(str(tmp_path / "none.txt"), 1)
