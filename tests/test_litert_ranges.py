"""The LiteRT quantizer's ranges (targets/litert.py): a tensor dead on every calibration image
keeps the int32 bias of the convolution reading it (a range of 1e-6 overflowed it, and v3's
litert-torch int8 file drifted +142%: README, "TFLite: two converters")."""
import numpy as np
import torch
from torch import nn

from targets.litert import convert_float, quantize_int8


class DeadReLU(nn.Module):
    """expand -> ReLU that never fires -> project: the output is the projection's bias."""

    def __init__(self):
        super().__init__()
        self.expand, self.act, self.project = nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.expand.weight.zero_()
            self.expand.bias.fill_(-1.0)
            self.project.bias.copy_(torch.tensor([3.0, -2.0]))

    def forward(self, x):
        return self.project(self.act(self.expand(x)))


def test_a_tensor_dead_on_every_calibration_image_keeps_its_readers_bias(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    images = np.random.default_rng(0).random((4, 1, 3, 8, 8), np.float32)
    program = tmp_path / "dead.pt2"
    torch.export.save(torch.export.export(DeadReLU().eval(), (torch.from_numpy(images[0]),)), str(program))
    convert_float(str(program), images[0], nhwc=False, dest=tmp_path / "fp32.tflite")
    quantize_int8(tmp_path / "fp32.tflite", images[:, 0], tmp_path / "int8.tflite", float_ops=[], stem_layers=0)
    interpreter = Interpreter(model_path=str(tmp_path / "int8.tflite"))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images[1])
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert out.shape == (1, 2, 8, 8)
    np.testing.assert_allclose(out[0, :, 0, 0], [3.0, -2.0], atol=0.05)
