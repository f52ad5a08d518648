from deeplab_cli.cli import main

main()
