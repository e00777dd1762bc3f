"""The LiteRT quantizer's ranges (targets/litert.py): a tensor dead on every calibration image
keeps the int32 bias of the convolution reading it (a range of 1e-6 overflowed it, and v3's
litert-torch int8 file drifted +142%: README, "TFLite: two converters")."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn


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


CONVERT_AND_RUN = """
import sys
from pathlib import Path
import numpy as np
from ai_edge_litert.interpreter import Interpreter
from targets.litert import convert_float, quantize_int8
tmp = Path(sys.argv[1])
images = np.load(tmp / "images.npy")
convert_float(str(tmp / "dead.pt2"), images[0], nhwc=False, dest=tmp / "fp32.tflite")
quantize_int8(tmp / "fp32.tflite", images[:, 0], tmp / "int8.tflite", float_ops=[], stem_layers=0)
interpreter = Interpreter(model_path=str(tmp / "int8.tflite"))
interpreter.allocate_tensors()
interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images[1])
interpreter.invoke()
print(*interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0, :, 0, 0])
"""


def test_a_tensor_dead_on_every_calibration_image_keeps_its_readers_bias(tmp_path):
    # The quantizer runs in its own process, as in quant.export: it imports JAX, and forks after it may hang
    images = np.random.default_rng(0).random((4, 1, 3, 8, 8), np.float32)
    np.save(tmp_path / "images.npy", images)
    program = torch.export.export(DeadReLU().eval(), (torch.from_numpy(images[0]),))
    torch.export.save(program, str(tmp_path / "dead.pt2"))
    ran = subprocess.run([sys.executable, "-c", CONVERT_AND_RUN, str(tmp_path)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert ran.returncode == 0, ran.stderr[-2000:]
    np.testing.assert_allclose([float(v) for v in ran.stdout.split()[-2:]], [3.0, -2.0], atol=0.05)
