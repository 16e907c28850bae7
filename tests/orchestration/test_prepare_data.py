"""`pipelines/prepare_data.py`: tokenise once into the cache training reads; bad data is one message."""

from __future__ import annotations

from pipelines import prepare_data


def test_prepare_caches_once_and_training_config_finds_it(tmp_path, capsys):
    args = [f"data.cache_dir={tmp_path}", "data.max_rows=2", "train.global_batch_size=8"]
    assert prepare_data.main(args) == 0
    out = capsys.readouterr().out
    files = sorted(tmp_path.glob("*.arrow"))
    assert len(files) == 1 and str(files[0]) in out
    rows = int(out.split(" training rows")[0].replace(",", ""))
    assert f"{rows // 8:,} steps/epoch" in out
    mtime = files[0].stat().st_mtime_ns
    assert prepare_data.main(args) == 0  # second time: served from the cache, not re-tokenised
    assert files[0].stat().st_mtime_ns == mtime and sorted(tmp_path.glob("*.arrow")) == files


def test_missing_file_is_one_clear_error(tmp_path, capsys):
    assert prepare_data.main([f"data.cache_dir={tmp_path}", f"data.source={tmp_path}/none.jsonl"]) == 2
    assert f"{tmp_path}/none.jsonl" in capsys.readouterr().err
