"""Training: the procedural demo world, the latent cache `framepack prepare` writes, data loading,
the transformer's training (`.train`, on `.samples`, `.optimizer`, `.distributed`, `.checkpoints`),
and the step caches' calibration on a model (`.calibrate`).

Submodules are imported on use (`framepack.training.world`, `.prepare`, `.data`), so importing this
package pulls in neither the encoders nor the video codecs.
"""
