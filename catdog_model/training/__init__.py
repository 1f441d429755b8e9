"""Training (torch, timm, accelerate, datasets): the data, the loop and its checkpoints, calibration and the
"neither" detector, the export of the serving engine, the evaluation report, the model card and the run folder."""


from ..errors import CatdogError


class TrainingError(CatdogError):
    """A training run cannot go on as asked; the message says why and what to do."""
