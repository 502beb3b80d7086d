import torch

from lightning_quant.demos import Classifier, DigitsCNN


def test_digits_cnn_shapes_for_8x8_and_28x28():
    net = DigitsCNN(width=8)
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_classifier_does_not_save_the_network_as_hyperparameter():
    model = Classifier(DigitsCNN(width=4), lr=0.1)
    assert "net" not in model.hparams and model.hparams.lr == 0.1
