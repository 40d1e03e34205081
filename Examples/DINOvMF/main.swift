// DINO-vMF and DINO, trained and evaluated on a CPU:
//
//     swift run -c release DINOvMF            # DINO-vMF on the built-in shapes dataset
//     swift run -c release DINOvMF --help     # every option
import KappaCommands

KappaCommand.name = "DINOvMF"
KappaCommand.defaultMethod = .dinoVMF
HostSetup.useFastestBLASKernels()
HostSetup.applyFaultInjection()
HostSetup.joinProcesses()
KappaCommand.main()
