"""The tensorrt-rtx backend: TensorRT-RTX plans for RTX GPUs, built ahead of time without a GPU for
chosen compute capabilities. Triton's TensorRT backend links data-centre TensorRT: it cannot serve them."""

from miaotui.engines.tensorrt_engine import TensorRTFamily


class TensorRTRTX(TensorRTFamily):
    name = "tensorrt-rtx"
    help = "tensorrt-rtx (RTX GPUs; builds ahead of time without a GPU)"
    preference = 10

    def builds_by_default(self) -> bool:
        return self.installed()  # it needs no GPU to build


BACKEND = TensorRTRTX()
