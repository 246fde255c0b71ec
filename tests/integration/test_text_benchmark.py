"""The text benchmark (issue 24, part 3): its domains load from the Python install (no
download), the split is fixed, and a tiny 2-domain run gives the documented fields."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_metagrad.benchmark import text as bench
from lightning_metagrad.data import text


def test_domains_load_without_download_and_keep_train_and_test_apart():
    for name in text.DOMAINS:
        domain = text.load_domain(name, max_train_bytes=1 << 14, max_test_bytes=1 << 12)
        assert domain.name == name
        assert 0 < len(domain.train) <= 1 << 14 and 0 < len(domain.test) <= 1 << 12
        assert set(domain.train_keys).isdisjoint(domain.test_keys)
        assert all(text.is_test_piece(k) for k in domain.test_keys)
        assert not any(text.is_test_piece(k) for k in domain.train_keys)


def test_split_is_deterministic():
    first = text.load_domains(("python", "prose"), max_train_bytes=1 << 13, max_test_bytes=1 << 11)
    again = text.load_domains(("python", "prose"), max_train_bytes=1 << 13, max_test_bytes=1 << 11)
    assert first == again
    a = text.train_loader(first[0], context=16, batch_size=4, steps=3, seed=7)
    b = text.train_loader(first[0], context=16, batch_size=4, steps=3, seed=7)
    for x, y in zip(a, b):
        assert torch.equal(x["x"], y["x"]) and torch.equal(x["y"], y["y"])
        assert torch.equal(x["x"][:, 1:], x["y"][:, :-1])  # next-byte pairs


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`domain`"):
        text.domain_pieces("poetry")
    with pytest.raises(ValueError, match="`max_test_bytes`"):
        text.load_domain("prose", max_test_bytes=0)
    with pytest.raises(ValueError, match="`domains`"):
        bench.TextBenchmarkConfig(domains=("prose",))
    with pytest.raises(ValueError, match="`methods`"):
        bench.TextBenchmarkConfig(methods=("nope",))


def test_two_domain_run_gives_the_documented_fields():
    config = bench.TextBenchmarkConfig(
        domains=("prose", "licenses"),
        steps=8,
        batch_size=4,
        context=16,
        d_model=16,
        layers=1,
        heads=2,
        methods=("naive", "metagrad"),
        seeds=(0,),
        test_windows=8,
        max_train_bytes=1 << 13,
        max_test_bytes=1 << 11,
    )
    results = bench.run_text_benchmark(config)
    assert set(results) == {"config", "environment", "domains", "methods"}
    assert results["environment"]["python"]
    for name in ("naive", "metagrad"):
        entry = results["methods"][name]
        for key in (
            "loss_matrix",
            "forgetting",
            "mean_forgetting",
            "final_loss",
            "final_perplexity",
            "step_ms",
            "step_ratio",
            "per_seed",
        ):
            assert key in entry
        assert list(entry["forgetting"]) == ["prose"]
        assert len(entry["loss_matrix"]) == 2 and len(entry["loss_matrix"][0]) == 2
        assert math.isclose(entry["final_perplexity"], math.exp(entry["final_loss"]))
        assert entry["final_loss"] < math.log(256)  # learned something over uniform bytes
    assert results["methods"]["naive"]["step_ratio"] == pytest.approx(1.0)
    assert results["methods"]["metagrad"]["step_ratio"] > 0
    table = bench.format_text_table(results)
    assert "| metagrad |" in table and "Δ prose" in table


@pytest.mark.slow
def test_text_domains_example_prints_both_loss_matrices(capsys):
    import importlib.util
    import sys

    from helpers import ROOT

    path = ROOT / "examples" / "text_domains.py"
    spec = importlib.util.spec_from_file_location("example_text_domains", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    results = module.main(["--steps", "10"])
    out = capsys.readouterr().out
    assert set(results) == {"plain", "MetaGrad"}
    for entry in results.values():
        assert len(entry["loss_matrix"]) == 3 and list(entry["forgetting"]) == ["python", "prose"]
    assert "plain: test loss" in out and "forgetting:" in out


def test_first_moment_prototype_routes_the_projection_to_exp_avg_only():
    """experiments/text_adamw.py's FirstMomentRouting: AdamW's moments after an adjusted step
    (check_routing), and a tiny 2-domain run in which the second domain's steps are routed."""
    import importlib.util
    import sys

    from helpers import ROOT

    path = ROOT / "experiments" / "text_adamw.py"
    spec = importlib.util.spec_from_file_location("experiment_text_adamw", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.check_routing()
    routing = module.FirstMomentRouting()
    routed = []
    route = routing._route
    routing._route = lambda opt: (routed.append(len(routing._raw)), route(opt))
    config = bench.TextBenchmarkConfig(
        domains=("prose", "licenses"), steps=8, batch_size=4, context=16, d_model=16,
        layers=1, heads=2, methods=("naive",), seeds=(0,), test_windows=8,
        max_train_bytes=1 << 13, max_test_bytes=1 << 11,
    )  # fmt: skip
    run = bench.run_text_method(config, "first-moment", 0, callbacks=routing.callbacks)
    assert routed[:8] == [0] * 8 and all(n > 0 for n in routed[8:])
    assert all(math.isfinite(x) for row in run["loss_matrix"] for x in row)
    with pytest.raises(ValueError, match="target='gradient'"):
        from lightning_metagrad import MetaGradCallback

        module.FirstMomentRouting(MetaGradCallback(target="update"))
