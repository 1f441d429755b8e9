"""Training (torch, timm, accelerate, datasets): the data, the loop and its checkpoints, calibration and the
"neither" detector, the export of the serving engine, the evaluation report, the model card and the run folder."""


class TrainingError(RuntimeError):
    """A problem the user can fix; the training script prints it as one line, without a traceback."""
