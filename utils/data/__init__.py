"""Where the data comes from (generated, disk, GCS, VOC), its loud checks, and batch sampling in
plain PyTorch terms."""
