from kgen_cli.cli import main

main()
