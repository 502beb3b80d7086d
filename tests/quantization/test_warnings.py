import warnings

from lightning_quant.quantization.warnings import known_torch_warnings_silenced


def test_only_known_warnings_are_silenced_and_filters_restored():
    filters_before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with known_torch_warnings_silenced():
            warnings.warn("torch.ao.quantization is deprecated and will be removed", DeprecationWarning, stacklevel=1)
            warnings.warn("something else", DeprecationWarning, stacklevel=1)
        warnings.warn("torch.ao.quantization is deprecated and will be removed", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "something else",
        "torch.ao.quantization is deprecated and will be removed",
    ]
    assert warnings.filters == filters_before
