"""Training: the procedural demo world, the latent cache `framepack prepare` writes, and data loading.

Submodules are imported on use (`framepack.training.world`, `.prepare`, `.data`), so importing this
package pulls in neither the encoders nor the video codecs.
"""
