from reweight_audit.cli import main

main()
