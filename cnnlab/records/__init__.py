"""What runs leave behind, read back: `cnnlab runs` lists them."""
