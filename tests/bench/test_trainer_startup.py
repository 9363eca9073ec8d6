"""bench/trainer_startup.py on a small synthetic split: the same counts every way, and no pass
over the records when the split sizes are given."""

from bench import trainer_startup


def test_sizes_give_the_same_counts_without_reading(tmp_path):
    rows = trainer_startup.main(
        ["--records=400", "--pool=600", "--image_bytes=100", f"--work_dir={tmp_path}"]
    )
    by = {(r["stage"], r["how"]): r for r in rows}
    for stage, examples in (("pretrain", 1000), ("finetune", 400)):
        read = by[(stage, "reading every record")]
        sized = by[(stage, "split sizes from the statistics")]
        assert read["examples"] == sized["examples"] == examples
        assert read["pretraining_read"] == sized["pretraining_read"] == 1000
        assert read["passes"] >= 1 and sized["passes"] == 0
    # A label subset needs the keys: one pass, over the labeled split only.
    subset = by[("finetune", "split sizes, 10% label fraction")]
    assert subset["passes"] == 1
    assert subset["examples"] == 400  # 400 classes of one record: at least one kept per class
