"""Developer tools shipped with the package (demo, emulator, strategy benchmark); the load path
never imports them."""
