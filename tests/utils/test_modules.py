from lightning_quant.utils.modules import within


def test_within_finds_the_module_or_its_container():
    assert within("encoder.layer.0.output", ["decoder", "encoder.layer"]) == "encoder.layer"
    assert within("encoder", ["encoder"]) == "encoder" and within("encoder", ["encoder"], strictly=True) is None
    assert within("encoder_2.fc", ["encoder"]) is None  # a prefix of the name is not a container
