"""The tensorrt backend: data-centre TensorRT 10/11 plans, built on (and for) the GPU they run on."""

from miaotui.engines.tensorrt_engine import TensorRTFamily


class TensorRT(TensorRTFamily):
    name = "tensorrt"
    help = "tensorrt (data-centre GPU, builds on one)"
    triton_platform = "tensorrt_plan"
    preference = 0

    def triton_model(self, engine, metadata, target, config) -> str:
        import shutil

        model_file = target / "model.plan"  # the file name Triton's TensorRT backend loads
        shutil.copyfile(engine, model_file)
        return model_file.name


BACKEND = TensorRT()
