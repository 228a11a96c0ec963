"bench_diagnose_cost: one row per round and a summary row whose share is the median of the rounds' diagnose/fit ratios."
import pytest
import torch

from fastai_l5.bench.diagnose_cost import bench_diagnose_cost


@pytest.mark.slow
def test_bench_diagnose_cost_rows_and_summary():
    torch.set_num_threads(1)
    df = bench_diagnose_cost(n_rows=1500, bs=64, epochs=1, rounds=2)
    rounds, summary = df.iloc[:-1], df.iloc[-1]
    assert len(rounds) == 2 and summary['round'] == 'summary' and (rounds['steps'] == 18).all()
    assert ((rounds['diagnose_s'] > 0) & (rounds['fit_s'] > 0)).all()
    assert abs(rounds['share'] - rounds['diagnose_s'] / rounds['fit_s']).max() < 1e-12
    assert summary['share'] == rounds['share'].median()
    assert summary['share_min'] == rounds['share'].min() and summary['share_max'] == rounds['share'].max()
    with pytest.raises(ValueError, match='rounds'): bench_diagnose_cost(rounds=0)
