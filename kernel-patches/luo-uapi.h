// The Live Update Orchestrator's user-space interface as kup's test programs use it: the ioctl
// numbers and layouts of include/uapi/linux/liveupdate.h in Debian's 7.2.13 and 7.3.4, written out
// here so that the host needs no 7.x kernel headers (luo-smoke.c, ppp-smoke.c).
#ifndef KUP_LUO_UAPI_H
#define KUP_LUO_UAPI_H
#include <stdint.h>
#include <sys/ioctl.h>

#define LIVEUPDATE_IOCTL_TYPE 0xBA
#define LIVEUPDATE_IOCTL_CREATE_SESSION _IO(LIVEUPDATE_IOCTL_TYPE, 0x00)
#define LIVEUPDATE_IOCTL_RETRIEVE_SESSION _IO(LIVEUPDATE_IOCTL_TYPE, 0x01)
#define LIVEUPDATE_SESSION_PRESERVE_FD _IO(LIVEUPDATE_IOCTL_TYPE, 0x40)
#define LIVEUPDATE_SESSION_RETRIEVE_FD _IO(LIVEUPDATE_IOCTL_TYPE, 0x41)
#define LIVEUPDATE_SESSION_FINISH _IO(LIVEUPDATE_IOCTL_TYPE, 0x42)

struct session_arg { uint32_t size; int32_t fd; uint8_t name[64]; };
struct fd_arg { uint32_t size; int32_t fd; uint64_t token __attribute__((aligned(8))); };
struct finish_arg { uint32_t size; uint32_t reserved; };
_Static_assert(sizeof(struct session_arg) == 72, "layout");
_Static_assert(sizeof(struct fd_arg) == 16, "layout");
#endif
