"""PIUmr, the reference model application, laid out as the paper is:

- `models.modelling`: X3D, pretrained X3D weights, TFAM, PIUmr and its CE + GIRL loss.
- `models.data`: MA-52 and the synthetic micro-action dataset.
- `models.training`: configuration, the training run and loop, checkpoints, logs.
- `models.evaluation`: metrics, predictions over a split, figures.

`python models/train.py`, `models/evaluate.py` and `models/prepare_ma52.py` are the commands.
"""
