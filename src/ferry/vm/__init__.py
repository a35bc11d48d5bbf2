"""The VM layer: guest images (``ferry.vm.image``) and, later, the QEMU runtime."""
