"""The training stages, in the order `pipeline.detector.train.train` runs them.

- `config`    – `TrainConfig` (data, model, fit and runtime sections) and the named profiles
- `prepare`   – sources -> samples per split, pixels, matcher references, the training order
- `fit`       – the classifier: head on cached features | the whole network | fine-tuning
- `calibrate` – matcher, fusion weights and decision thresholds, chosen on the validation split
- `report`    – the held-out test split: metrics at those thresholds, PR curve, folders export

Registering and activating the version is the last step of `train` itself.
"""
