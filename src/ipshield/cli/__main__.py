from ipshield.cli import main

main()
