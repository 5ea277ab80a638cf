"""The progress display: time left for the whole run (steps and evaluations to come), a bar for each pass."""

from rich.console import Console
from tiny import learnable_rows, save_model, tiny_gpt2, write_jsonl

import lorakit.training.loop as loop
from lorakit.training.config import build_config


def test_evaluations_left_count_the_periodic_ones_and_the_final_one():
    every3 = loop.evals_left(build_config({"eval_every": 3}), total=10, evaluates=True)
    assert [every3(step) for step in (0, 2, 3, 8, 9, 10)] == [4, 4, 3, 2, 1, 0]  # after steps 3, 6, 9, then 10
    final_only = loop.evals_left(build_config({}), total=10, evaluates=True)
    assert [final_only(step) for step in (0, 9, 10)] == [1, 1, 0]
    assert loop.evals_left(build_config({"eval_every": 3}), total=10, evaluates=False)(0) == 0


def test_time_left_adds_the_steps_and_the_evaluations_to_come():
    bar = loop._Progress(Console(file=None, quiet=True), total=10, start=0, evals_left=lambda step: 2)
    bar.eval_seconds.append(5.0)
    bar.update(1, 1.0, 1e-3, 100.0, seconds=1.0)
    bar.update(2, 1.0, 1e-3, 100.0, seconds=3.0)
    assert bar.seconds_left(2) == 8 * 2.0 + 2 * 5.0  # mean step 2 s, mean evaluation 5 s
    assert loop._clock(3725.4) == "1:02:05"


def test_each_evaluation_pass_has_its_own_bar(tmp_path, monkeypatch):
    passes = []
    real = loop._Progress.pass_bar

    def spy(self, what, total, timed=True):
        record = {"what": what, "total": total, "advanced": 0}
        passes.append(record)
        context = real(self, what, total, timed)

        class Counting:
            def __enter__(self_):
                advance = context.__enter__()

                def counted():
                    record["advanced"] += 1
                    advance()

                return counted

            def __exit__(self_, *exc):
                return context.__exit__(*exc)

        return Counting()

    monkeypatch.setattr(loop._Progress, "pass_bar", spy)
    base = save_model(tiny_gpt2(), tmp_path / "base")
    train = write_jsonl(tmp_path / "train.jsonl", learnable_rows(8, seed=0))
    dev = write_jsonl(tmp_path / "dev.jsonl", learnable_rows(5, seed=1))
    values = dict(model=str(base), data=str(train), eval_data=str(dev), out=str(tmp_path / "run"))
    cfg = build_config(values | dict(max_steps=4, eval_every=2, batch_size=2))
    loop.train(cfg, Console(file=None, quiet=True))
    # step 0 runs before the display; then steps 2 and 4: 5 rows in batches of 2, 3 batches each, each advanced
    assert passes == [{"what": "eval", "total": 3, "advanced": 3}] * 2
