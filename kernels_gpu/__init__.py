"""kernels_gpu package."""
