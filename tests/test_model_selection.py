"""Early stopping, the choice among train candidates and the results table's standing line, on hand-made values."""

import pytest


def test_early_stopping_keeps_the_strict_minimum_and_stops_after_patience():
    from stages.train.validation import EarlyStopping

    stop = EarlyStopping(patience=2)
    decisions = [stop.update(kl, step) for kl, step in [(3.0, 10), (2.0, 20), (2.0, 30), (2.5, 40)]]
    assert decisions == [True, True, False, False]  # a tie is not a new best
    assert (stop.best_kl, stop.best_step, stop.stale, stop.stop) == (2.0, 20, 2, True)
    again = EarlyStopping.from_dict(2, stop.to_dict())  # what a resumed run restores
    assert again == stop
    never = EarlyStopping(patience=0)
    for step in range(1, 50):
        never.update(1.0, step)
    assert not never.stop and never.best_step == 1


def test_plateau_decay_halves_the_rate_after_each_validation_without_a_new_best_and_survives_a_resume():
    from stages.train.validation import EarlyStopping

    stop = EarlyStopping(patience=3, decay=0.5)
    scales = []
    for kl, step in [(3.0, 10), (3.5, 20), (2.0, 30), (2.0, 40), (2.1, 50)]:
        stop.update(kl, step)
        scales.append(stop.lr_scale)
    assert scales == [1.0, 0.5, 0.5, 0.25, 0.125]  # a new best keeps the rate reached; no return to 1
    again = EarlyStopping.from_dict(3, stop.to_dict(), decay=0.5)
    assert again == stop
    assert EarlyStopping.from_dict(3, {"best_kl": 1.0}).lr_scale == 1.0  # a checkpoint from before the option


def test_validations_of_the_warm_up_keep_the_best_but_neither_count_nor_decay():
    from stages.train.validation import EarlyStopping

    stop = EarlyStopping(patience=1, decay=0.5)
    warm = [stop.update(kl, step, count=False) for kl, step in [(2.0, 10), (3.0, 20), (1.5, 30), (4.0, 40)]]
    assert warm == [True, False, True, False]
    assert (stop.best_kl, stop.best_step, stop.stale, stop.lr_scale, stop.stop) == (1.5, 30, 0, 1.0, False)
    assert not stop.update(1.5, 50) and stop.stop and stop.lr_scale == 0.5  # the first counted one


def test_choose_takes_the_lowest_validation_kl_and_the_first_on_ties():
    from stages.train.driver import choose

    assert choose([{"val_kl_best": 0.5}, {"val_kl_best": 0.2}, {"val_kl_best": 0.3}]) == 1
    assert choose([{"val_kl_best": 0.2}, {"val_kl_best": 0.2}]) == 0


def test_candidates_apply_their_settings_and_drop_duplicates():
    from pipeline.config import ConfigError, config_from_dict
    from stages.train.driver import candidate_configs, run_hash

    base = {"model": {"path": "m"}, "train": {"validate_every": 5, "entropy_weight": 1.0, "collapse_weight": 1.0}}
    config = config_from_dict({**base, "train": {**base["train"], "candidates": [
        {"entropy_weight": 0.1, "collapse_weight": 0.1}, {"entropy_weight": 1.0}, {"lr": 0.01},
        {"entropy_weight": 0.1, "collapse_weight": 0.1, "plateau_start": 0.5}]}})
    variants = candidate_configs(config)
    assert [(v.train.entropy_weight, v.train.collapse_weight, v.train.lr, v.train.plateau_start) for v in variants] == \
        [(1.0, 1.0, 1e-3, 0.0), (0.1, 0.1, 1e-3, 0.0), (1.0, 1.0, 0.01, 0.0), (0.1, 0.1, 1e-3, 0.5)]
    # ({"entropy_weight": 1.0} is the section itself)
    plain = config_from_dict(base)
    plan = {"identity": ["data"]}
    # candidate 0 is reused by a run without candidates; the rate as a whole is not (its choice differs)
    assert run_hash(variants[0], 0.9, plan) == run_hash(plain, 0.9, plan) != run_hash(config, 0.9, plan)
    assert run_hash(variants[1], 0.9, plan) != run_hash(variants[3], 0.9, plan)  # plateau_start is part of it
    with pytest.raises(ConfigError, match="plateau_start"):
        config_from_dict({**base, "train": {**base["train"], "candidates": [{"plateau_start": 1.0}]}})
    with pytest.raises(ConfigError, match="validate_every"):
        config_from_dict({"model": {"path": "m"}, "train": {"candidates": [{"lr": 0.01}]}})
    with pytest.raises(ConfigError, match="sets nothing"):
        config_from_dict({"model": {"path": "m"}, "train": {"validate_every": 5, "candidates": [{}]}})
    with pytest.raises(ConfigError, match="optimizer"):
        config_from_dict({"model": {"path": "m"}, "train": {"validate_every": 5, "candidates": [{"optimizer": "x"}]}})


def test_locality_unset_keeps_earlier_runs_reusable_and_set_is_part_of_the_hash():
    from pipeline.config import ConfigError, config_from_dict
    from stages.train.driver import candidate_configs, run_hash

    base = {"model": {"path": "m"}, "train": {"validate_every": 5, "candidates": [{"lr": 0.01}]}}
    plan = {"identity": ["data"]}
    # the value this config hashed to before train.locality existed (commit 0285959): its trained outputs stay valid
    assert run_hash(config_from_dict(base), 0.9, plan) == "2c7f7a745f7e78e3"
    local = config_from_dict({**base, "train": {**base["train"], "candidates": [{"locality": 1.0}]}})
    variants = candidate_configs(local)
    assert [v.train.locality for v in variants] == [0.0, 1.0]
    assert run_hash(variants[1], 0.9, plan) != run_hash(variants[0], 0.9, plan)
    with pytest.raises(ConfigError, match="locality"):
        config_from_dict({"model": {"path": "m"}, "train": {"locality": -0.5}})


def test_spatial_prior_unset_keeps_earlier_runs_reusable_and_excludes_locality():
    from pipeline.config import ConfigError, config_from_dict
    from stages.train.driver import candidate_configs, run_hash

    base = {"model": {"path": "m"}, "train": {"validate_every": 5, "candidates": [{"lr": 0.01}]}}
    plan = {"identity": ["data"]}
    assert run_hash(config_from_dict(base), 0.9, plan) == "2c7f7a745f7e78e3"  # as before the option existed
    prior = config_from_dict({**base, "train": {**base["train"], "candidates": [{"spatial_prior": 10.0}]}})
    variants = candidate_configs(prior)
    assert [v.train.spatial_prior for v in variants] == [0.0, 10.0]
    assert run_hash(variants[1], 0.9, plan) != run_hash(variants[0], 0.9, plan)
    for bad, match in (({"spatial_prior": -1.0}, "spatial_prior"),
                       ({"locality": 1.0, "candidates": [{"spatial_prior": 10.0}]}, "replaces the locality"),
                       ({"candidates": [{"spatial_prior": 10.0, "locality": 1.0}]}, "replaces the locality")):
        with pytest.raises(ConfigError, match=match):
            config_from_dict({"model": {"path": "m"}, "train": {"validate_every": 5, **bad}})


def test_standing_names_every_method_not_beaten():
    from pipeline.reports import results_markdown, standing

    members = [{"method": "full", "rate": None, "Avg": 97.0}, {"method": "metacompress", "rate": 0.9, "Avg": 70.0},
               {"method": "fastv", "rate": 0.9, "Avg": 84.9}, {"method": "sample", "rate": 0.9, "Avg": 70.0},
               {"method": "random", "rate": 0.9, "Avg": 50.0}]
    assert standing(members) == "MetaCompress (70.00) does not beat: FastV (84.90), Sample (70.00)."
    members[2]["Avg"] = members[3]["Avg"] = 60.0
    assert standing(members) == "MetaCompress (70.00) beats every other method evaluated here (3)."
    table = results_markdown([dict(m, Acc_1=m["Avg"]) for m in members])
    assert "beats every other method evaluated here (3)" in table and "Gap:" not in table
    # with the paired comparison: each gap and its 95 % half-width (1.96 standard errors)
    members[2].update(vs_metacompress=10.0, vs_metacompress_se=2.0, vs_metacompress_dialogues=150)
    members[3].update(vs_metacompress=10.0, vs_metacompress_se=None, vs_metacompress_dialogues=1)
    assert standing(members) == ("MetaCompress (70.00) beats every other method evaluated here (3); the closest, "
                                 "FastV (60.00), by +10.00 ± 3.92.")
    members[2].update(Avg=72.5, vs_metacompress=-2.5)
    assert standing(members) == "MetaCompress (70.00) does not beat: FastV (72.50, gap -2.50 ± 3.92)."
    assert "Gap: MetaCompress's Avg minus" in results_markdown([dict(m, Acc_1=m["Avg"]) for m in members])
    members[2].update(Avg=70.0, vs_metacompress=-1e-9)  # a tie
    assert standing(members) == "MetaCompress (70.00) does not beat: FastV (70.00, gap +0.00 ± 3.92)."
