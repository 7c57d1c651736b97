from kgen_cli import main

main()
