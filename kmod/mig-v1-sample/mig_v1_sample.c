// SPDX-License-Identifier: GPL-2.0
/*
 * mig_v1_sample: a mediated device implementing the VFIO v1 migration region.
 *
 * No upstream driver ever implemented the v1 migration interface (the
 * VFIO_REGION_TYPE_MIGRATION region of Linux 5.8-5.17, removed from the uAPI in
 * 5.18). This sample gives a userspace v1 driver (vfio-mig) a real kernel
 * device to run against: region discovery through VFIO_DEVICE_GET_REGION_INFO
 * and its capability chain, trapped pread/pwrite of struct
 * vfio_device_migration_info, and an mmapped (sparse-mmap) data section.
 *
 * Two mdev types, both vfio-pci-like (device_api "vfio-pci"):
 *   mig-v1-trapped  data section served by read/write only
 *   mig-v1-mmap     data section also mmappable (VFIO_REGION_INFO_CAP_SPARSE_MMAP)
 *
 * Regions (offset of region i in the device fd: i << 40):
 *   0 (BAR0)    4 KiB of control, statistics and debug registers
 *   1 (BAR1)    the device's state: state_size bytes of memory (what migrates)
 *   7 (config)  256 bytes of PCI configuration space
 *   8 (VGA)     absent (EINVAL), as on a PCI function without VGA
 *   9           the v1 migration region (VFIO_REGION_INFO_CAP_TYPE 3/1)
 *
 * See docs/v1-sample-module.md in the vfio-mig repository for the register map
 * and the stream format.
 */

#include <linux/bitmap.h>
#include <linux/crc32.h>
#include <linux/device.h>
#include <linux/jiffies.h>
#include <linux/kernel.h>
#include <linux/mdev.h>
#include <linux/minmax.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/overflow.h>
#include <linux/pci_regs.h>
#include <linux/slab.h>
#include <linux/sysfs.h>
#include <linux/uaccess.h>
#include <linux/unaligned.h>
#include <linux/vfio.h>
#include <linux/vmalloc.h>
#include <linux/workqueue.h>

#define MV1_NAME		"mig_v1_sample"
#define MV1_CLASS_NAME		"mig-v1"	/* mdev types: mig-v1-trapped, mig-v1-mmap */
#define MV1_PARENT_NAME		"mig-v1-sample"

/*
 * The v1 migration uAPI, removed from include/uapi/linux/vfio.h in Linux 5.18,
 * defined here under our own names. These values and this layout are ABI.
 */
#define MV1_REGION_TYPE_MIGRATION	3
#define MV1_REGION_SUBTYPE_MIGRATION	1

#define MV1_STATE_STOP		0x0u
#define MV1_STATE_RUNNING	0x1u	/* bit 0 */
#define MV1_STATE_SAVING	0x2u	/* bit 1 */
#define MV1_STATE_RESUMING	0x4u	/* bit 2 */
#define MV1_STATE_MASK		0x7u	/* bits 3-31 are reserved */
#define MV1_STATE_PRECOPY	(MV1_STATE_RUNNING | MV1_STATE_SAVING)
#define MV1_STATE_STOPCOPY	MV1_STATE_SAVING
#define MV1_STATE_ERROR		(MV1_STATE_SAVING | MV1_STATE_RESUMING)

struct mv1_migration_info {
	__u32 device_state;
	__u32 reserved;
	__u64 pending_bytes;
	__u64 data_offset;
	__u64 data_size;
};

static_assert(sizeof(struct mv1_migration_info) == 32);
static_assert(offsetof(struct mv1_migration_info, device_state) == 0);
static_assert(offsetof(struct mv1_migration_info, pending_bytes) == 8);
static_assert(offsetof(struct mv1_migration_info, data_offset) == 16);
static_assert(offsetof(struct mv1_migration_info, data_size) == 24);
#ifdef VFIO_REGION_TYPE_MIGRATION_DEPRECATED
static_assert(MV1_REGION_TYPE_MIGRATION == VFIO_REGION_TYPE_MIGRATION_DEPRECATED);
static_assert(MV1_REGION_SUBTYPE_MIGRATION == VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED);
#endif

#define MV1_OFF_STATE		offsetof(struct mv1_migration_info, device_state)
#define MV1_OFF_PENDING		offsetof(struct mv1_migration_info, pending_bytes)
#define MV1_OFF_DATA_OFFSET	offsetof(struct mv1_migration_info, data_offset)
#define MV1_OFF_DATA_SIZE	offsetof(struct mv1_migration_info, data_size)
#define MV1_INFO_SIZE		sizeof(struct mv1_migration_info)

/*
 * Reserved bits 3-31 of device_state the device keeps set, so that a user that
 * does not read-modify-write device_state is refused (bits 3, 8 and 31).
 */
#define MV1_RESERVED_BITS	0x80000108u

/* Device fd offsets: region index in bits 40-63, as vfio-pci does. */
#define MV1_OFFSET_SHIFT	40
#define MV1_INDEX_TO_OFFSET(i)	((u64)(i) << MV1_OFFSET_SHIFT)
#define MV1_OFFSET_TO_INDEX(o)	((o) >> MV1_OFFSET_SHIFT)
#define MV1_OFFSET_MASK		((1ULL << MV1_OFFSET_SHIFT) - 1)

#define MV1_MIG_REGION_INDEX	VFIO_PCI_NUM_REGIONS	/* 9: first device-specific */
#define MV1_NUM_REGIONS		(VFIO_PCI_NUM_REGIONS + 1)
#define MV1_REGS_SIZE		4096u
#define MV1_CONFIG_SIZE		256u

/*
 * Data section. mig-v1-mmap: at PAGE_SIZE, chunk_size bytes, one sparse-mmap
 * area. mig-v1-trapped: at 64 (not page aligned), chunk_size + 64 bytes, and
 * transactions alternate between section offsets 0 and 64, so a user must
 * honour data_offset on every transaction.
 */
#define MV1_TRAPPED_BASE	64u
#define MV1_TRAPPED_SHIFT	64u

/* State pages and the stream. */
#define MV1_PAGE		4096u
#define MV1_TX_MAGIC		0x5431564du	/* "MV1T" */
#define MV1_TX_HDR		16u	/* magic, seq, length (header included), crc32 */
#define MV1_STREAM_VERSION	1u
#define MV1_REC_HDR		8u	/* type, argument */
#define MV1_HDR_REC		(MV1_REC_HDR + 16u)
#define MV1_PAGE_REC		(MV1_REC_HDR + MV1_PAGE)
#define MV1_END_REC		(MV1_REC_HDR + 8u)
#define MV1_REC_MAX		MV1_PAGE_REC

enum mv1_record {
	MV1_REC_HEADER = 1,	/* arg: version; state_size, page, pages, flags */
	MV1_REC_PAGE = 2,	/* arg: page index; the page's bytes */
	MV1_REC_END = 3,	/* arg: pages; crc32 of the whole state, 0 */
};

/* BAR0 registers (32-bit, accessed 4 bytes wide at their own offset). */
#define MV1_REG_ID		0x000	/* RO "MGV1" */
#define MV1_REG_VERSION		0x004	/* RO 1 */
#define MV1_REG_STATE_SIZE	0x008	/* RO bytes of state (BAR1) */
#define MV1_REG_CHUNK_SIZE	0x00c	/* RO largest transaction */
#define MV1_REG_PAGE_SIZE	0x010	/* RO state page size */
#define MV1_REG_FLAGS		0x014	/* RO bit 0: data section mmappable */
#define MV1_REG_DEVICE_STATE	0x018	/* RO raw device_state */
#define MV1_REG_DIRTY_RATE	0x020	/* RW pages dirtied per tick in PRE-COPY */
#define MV1_REG_DIRTY_PERIOD	0x024	/* RW tick in ms (1-1000) */
#define MV1_REG_FORCE_ERROR	0x028	/* WO non-zero: enter ERROR now */
#define MV1_REG_FAIL_NEXT	0x02c	/* RW fail the next access of a kind */
#define MV1_REG_DIRTY_PER_ITER	0x030	/* RW pages dirtied per pending_bytes read in PRE-COPY */
#define MV1_REG_SAVE_PASSES	0x040	/* RO passes over the dirty bitmap */
#define MV1_REG_SAVE_PAGES	0x044	/* RO page records sent */
#define MV1_REG_SAVE_TXS	0x048	/* RO transactions staged */
#define MV1_REG_SAVE_DIRTIED	0x04c	/* RO pages dirtied again while saving */
#define MV1_REG_LOAD_TXS	0x050	/* RO transactions accepted */
#define MV1_REG_LOAD_PAGES	0x054	/* RO page records loaded */
#define MV1_REG_REFUSALS	0x058	/* RO accesses refused (all time) */
#define MV1_REG_LAST_REFUSAL	0x05c	/* RO enum mv1_refusal of the last one */
#define MV1_REG_RESETS		0x060	/* RO VFIO_DEVICE_RESETs */
#define MV1_REG_SAVES_DONE	0x064	/* RO saves ended in STOP */
#define MV1_REG_RESUMES_DONE	0x068	/* RO resumes ended in RUNNING */

#define MV1_ID			0x3156474du	/* "MGV1" */
#define MV1_FLAG_MMAP		0x1u

/* MV1_REG_FAIL_NEXT values: the next such access fails with EIO, device in ERROR. */
enum mv1_fail {
	MV1_FAIL_NONE = 0,
	MV1_FAIL_STATE_WRITE = 1,
	MV1_FAIL_PENDING_READ = 2,
	MV1_FAIL_DATA_OFFSET_READ = 3,
	MV1_FAIL_DATA_SIZE_READ = 4,
	MV1_FAIL_DATA_SIZE_WRITE = 5,
	MV1_FAIL_MAX = MV1_FAIL_DATA_SIZE_WRITE,
};

/* Why an access was refused (MV1_REG_LAST_REFUSAL). */
enum mv1_refusal {
	MV1_REF_NONE = 0,
	MV1_REF_ACCESS = 1,		/* offset or width not a field's */
	MV1_REF_WRONG_STATE = 2,	/* field not usable in this state */
	MV1_REF_RESERVED_BITS = 3,	/* device_state write changes bits 3-31 */
	MV1_REF_NOT_REQUESTABLE = 4,	/* 101b, 111b or 110b requested */
	MV1_REF_NO_ARC = 5,		/* no such transition in the uAPI */
	MV1_REF_IN_ERROR = 6,		/* device in ERROR: only a reset helps */
	MV1_REF_DATA_PENDING = 7,	/* STOP-AND-COPY -> STOP with data left */
	MV1_REF_NOTHING_PENDING = 8,	/* data_offset read with nothing pending */
	MV1_REF_NOT_STAGED = 9,		/* data_size/data read, nothing staged */
	MV1_REF_OUTSIDE_STAGED = 10,	/* data read outside the staged chunk */
	MV1_REF_SIZE_RANGE = 11,	/* data_size write out of range */
	MV1_REF_TX_MAGIC = 12,		/* transaction magic wrong */
	MV1_REF_TX_SEQ = 13,		/* transaction out of order */
	MV1_REF_TX_SIZE = 14,		/* data_size != the source's transaction */
	MV1_REF_TX_CRC = 15,		/* transaction payload corrupt */
	MV1_REF_STREAM = 16,		/* undecodable stream (device -> ERROR) */
	MV1_REF_INCOMPLETE = 17,	/* RESUMING -> RUNNING with bad state */
	MV1_REF_READ_ONLY = 18,		/* write of pending_bytes/data_offset */
	MV1_REF_NOT_RUNNING = 19,	/* state window written while stopped */
};

static const char *const mv1_refusal_names[] = {
	[MV1_REF_NONE] = "none",
	[MV1_REF_ACCESS] = "access not at a field's offset and width",
	[MV1_REF_WRONG_STATE] = "field not usable in this device_state",
	[MV1_REF_RESERVED_BITS] = "device_state write changes reserved bits",
	[MV1_REF_NOT_REQUESTABLE] = "device_state value cannot be requested",
	[MV1_REF_NO_ARC] = "no such device_state transition",
	[MV1_REF_IN_ERROR] = "device in ERROR, needs a reset",
	[MV1_REF_DATA_PENDING] = "STOP with data pending",
	[MV1_REF_NOTHING_PENDING] = "data_offset read with nothing pending",
	[MV1_REF_NOT_STAGED] = "nothing staged",
	[MV1_REF_OUTSIDE_STAGED] = "data access outside the staged chunk",
	[MV1_REF_SIZE_RANGE] = "data_size out of range",
	[MV1_REF_TX_MAGIC] = "transaction magic",
	[MV1_REF_TX_SEQ] = "transaction out of order",
	[MV1_REF_TX_SIZE] = "data_size differs from the transaction's size",
	[MV1_REF_TX_CRC] = "transaction crc",
	[MV1_REF_STREAM] = "undecodable state stream",
	[MV1_REF_INCOMPLETE] = "resumed state incomplete or inconsistent",
	[MV1_REF_READ_ONLY] = "read-only field",
	[MV1_REF_NOT_RUNNING] = "state written while the device is stopped",
};

static unsigned int state_size = 256 * 1024;
module_param(state_size, uint, 0444);
MODULE_PARM_DESC(state_size,
		 "Bytes of device state per device, behind BAR1 (4 KiB to 64 MiB, rounded up to 4 KiB; default 256 KiB)");

static unsigned int chunk_size = 64 * 1024;
module_param(chunk_size, uint, 0444);
MODULE_PARM_DESC(chunk_size,
		 "Data section size = largest transaction (4 KiB to 4 MiB, rounded up to the page size; default 64 KiB)");

static unsigned int max_devices = 8;
module_param(max_devices, uint, 0444);
MODULE_PARM_DESC(max_devices, "Devices that can be created, all types together (default 8)");

struct mv1_type {
	struct mdev_type type;
	bool mmap;
};

/* An ongoing save: pre-copy or stop-and-copy. */
struct mv1_save {
	u32 seq;		/* sequence number of the next transaction */
	u32 staged;		/* length of the staged transaction, 0: none */
	u32 staged_at;		/* its offset in the data section */
	bool final;		/* stop-and-copy: END follows the last page */
	bool header_done;	/* HEADER record started */
	bool end_done;		/* END record started */
	u32 cursor;		/* next page to look at */
	u32 ndirty;		/* pages still to send */
	u32 rec_len;		/* record being emitted (in save_rec) */
	u32 rec_off;		/* bytes of it emitted */
};

/* An ongoing resume. */
struct mv1_resume {
	u32 next_seq;		/* sequence number the next transaction must have */
	u32 rec_have;		/* bytes of the current record in load_rec */
	u32 rec_need;		/* its full length, 0 until its header is in */
	u32 pages_seen;		/* distinct pages received */
	u32 end_crc;
	bool header_ok;
	bool end_ok;
};

struct mv1_state {
	struct vfio_device vdev;
	struct mutex lock;	/* everything below, except what init sets */
	bool mmap;		/* mig-v1-mmap */
	u32 npages;
	u64 data_base;		/* region offset of the data section */
	u32 section_len;	/* bytes of the data section */
	u8 *mem;		/* the device's state (BAR1) */
	u8 *shadow;		/* resume target, swapped in when resumed */
	u8 *section;		/* data section (vmalloc_user: mmappable) */
	u8 *scratch;		/* a committed transaction, copied out of the section */
	u8 *save_rec;
	u8 *load_rec;
	unsigned long *dirty;
	unsigned long *seen;

	u32 device_state;	/* raw, reserved bits included */
	struct mv1_save save;
	struct mv1_resume resume;

	u8 vconfig[MV1_CONFIG_SIZE];
	u32 bar_size[2];

	u32 dirty_rate;
	u32 dirty_period_ms;
	u32 dirty_per_iter;
	u32 fail_next;
	u64 dirty_gen;
	u32 rng;
	struct delayed_work dirty_work;

	u32 st_passes;
	u32 st_pages_sent;
	u32 st_txs_saved;
	u32 st_dirtied;
	u32 st_txs_loaded;
	u32 st_pages_loaded;
	u32 st_refusals;
	u32 st_last_refusal;
	u32 st_resets;
	u32 st_saves_done;
	u32 st_resumes_done;
};

struct mv1_parent {
	struct device dev;
	struct mdev_parent parent;
};

static struct mv1_parent *mv1_parent;
static atomic_t mv1_available;
static atomic_t mv1_serial;

static const struct vfio_device_ops mv1_dev_ops;

static struct mv1_type mv1_types[] = {
	{ .type = { .sysfs_name = "trapped", .pretty_name = "v1 migration, trapped data section" },
	  .mmap = false },
	{ .type = { .sysfs_name = "mmap", .pretty_name = "v1 migration, mmapped data section" },
	  .mmap = true },
};

static struct mdev_type *mv1_mdev_types[] = {
	&mv1_types[0].type,
	&mv1_types[1].type,
};

static inline u32 mv1_bits(const struct mv1_state *s)
{
	return s->device_state & MV1_STATE_MASK;
}

static inline bool mv1_is_saving(u32 bits)
{
	return bits == MV1_STATE_PRECOPY || bits == MV1_STATE_STOPCOPY;
}

static inline bool mv1_requestable(u32 bits)
{
	/* Not ERROR (110b) nor one of the invalid 101b, 111b. */
	return bits != MV1_STATE_ERROR && bits != 0x5u && bits != 0x7u;
}

static inline u32 mv1_crc(const void *p, size_t len)
{
	return crc32_le(~0u, p, len) ^ ~0u;
}

/* Refuses an access with EINVAL, remembering why. */
static int mv1_refuse(struct mv1_state *s, enum mv1_refusal why)
{
	s->st_refusals++;
	s->st_last_refusal = why;
	dev_dbg(s->vdev.dev, "refused: %s (device_state %#010x)\n",
		mv1_refusal_names[why], s->device_state);
	return -EINVAL;
}

static void mv1_enter_error(struct mv1_state *s)
{
	s->device_state = (s->device_state & ~MV1_STATE_MASK) | MV1_STATE_ERROR;
	s->save.staged = 0;
}

/* A FAIL_NEXT knob matching @kind fires: EIO, and the device fails. */
static int mv1_fault(struct mv1_state *s, enum mv1_fail kind)
{
	if (s->fail_next != kind)
		return 0;
	s->fail_next = MV1_FAIL_NONE;
	mv1_enter_error(s);
	dev_dbg(s->vdev.dev, "injected failure %d: device in ERROR\n", kind);
	return -EIO;
}

/* ---- the saving side ---------------------------------------------------- */

/* Stream bytes not yet emitted. */
static u64 mv1_stream_left(const struct mv1_state *s)
{
	const struct mv1_save *sv = &s->save;
	u64 n = sv->rec_len - sv->rec_off;

	if (!sv->header_done)
		n += MV1_HDR_REC;
	n += (u64)sv->ndirty * MV1_PAGE_REC;
	if (sv->final && !sv->end_done)
		n += MV1_END_REC;
	return n;
}

/* pending_bytes: the stream left, in transactions of at most chunk_size. */
static u64 mv1_pending(const struct mv1_state *s)
{
	u64 left = mv1_stream_left(s);
	u64 per_tx = chunk_size - MV1_TX_HDR;

	return left + DIV_ROUND_UP_ULL(left, per_tx) * MV1_TX_HDR;
}

/* Where transaction @seq lives in the data section. */
static u32 mv1_tx_at(const struct mv1_state *s, u32 seq)
{
	return (!s->mmap && (seq & 1)) ? MV1_TRAPPED_SHIFT : 0;
}

/* Starts the next record in save_rec; false when the stream is exhausted. */
static bool mv1_next_record(struct mv1_state *s)
{
	struct mv1_save *sv = &s->save;
	u8 *r = s->save_rec;
	u32 page;

	sv->rec_off = 0;
	sv->rec_len = 0;
	if (!sv->header_done) {
		put_unaligned_le32(MV1_REC_HEADER, r);
		put_unaligned_le32(MV1_STREAM_VERSION, r + 4);
		put_unaligned_le32(s->npages * MV1_PAGE, r + 8);
		put_unaligned_le32(MV1_PAGE, r + 12);
		put_unaligned_le32(s->npages, r + 16);
		put_unaligned_le32(0, r + 20);
		sv->rec_len = MV1_HDR_REC;
		sv->header_done = true;
		return true;
	}
	if (sv->ndirty) {
		page = find_next_bit(s->dirty, s->npages, sv->cursor);
		if (page >= s->npages) {
			/* Wrapped: the pages dirtied behind the cursor start a new pass. */
			page = find_first_bit(s->dirty, s->npages);
			s->st_passes++;
		}
		if (WARN_ON_ONCE(page >= s->npages)) {
			sv->ndirty = 0;
			return false;
		}
		clear_bit(page, s->dirty);
		sv->ndirty--;
		sv->cursor = page + 1;
		put_unaligned_le32(MV1_REC_PAGE, r);
		put_unaligned_le32(page, r + 4);
		memcpy(r + MV1_REC_HDR, s->mem + (size_t)page * MV1_PAGE, MV1_PAGE);
		sv->rec_len = MV1_PAGE_REC;
		s->st_pages_sent++;
		return true;
	}
	if (sv->final && !sv->end_done) {
		/* Stop-and-copy: the state no longer changes; seal it. */
		put_unaligned_le32(MV1_REC_END, r);
		put_unaligned_le32(s->npages, r + 4);
		put_unaligned_le32(mv1_crc(s->mem, (size_t)s->npages * MV1_PAGE), r + 8);
		put_unaligned_le32(0, r + 12);
		sv->rec_len = MV1_END_REC;
		sv->end_done = true;
		return true;
	}
	return false;
}

/* Emits up to @max stream bytes into @out; records span transactions. */
static u32 mv1_emit(struct mv1_state *s, u8 *out, u32 max)
{
	struct mv1_save *sv = &s->save;
	u32 done = 0, n;

	while (done < max) {
		if (sv->rec_off == sv->rec_len && !mv1_next_record(s))
			break;
		n = min(max - done, sv->rec_len - sv->rec_off);
		memcpy(out + done, s->save_rec + sv->rec_off, n);
		sv->rec_off += n;
		done += n;
	}
	return done;
}

/* Stages the next transaction in the data section (data_offset read). */
static void mv1_stage(struct mv1_state *s)
{
	struct mv1_save *sv = &s->save;
	u32 at = mv1_tx_at(s, sv->seq);
	u8 *tx = s->section + at;
	u32 payload = mv1_emit(s, tx + MV1_TX_HDR, chunk_size - MV1_TX_HDR);

	put_unaligned_le32(MV1_TX_MAGIC, tx);
	put_unaligned_le32(sv->seq, tx + 4);
	put_unaligned_le32(MV1_TX_HDR + payload, tx + 8);
	put_unaligned_le32(mv1_crc(tx + MV1_TX_HDR, payload), tx + 12);
	sv->staged = MV1_TX_HDR + payload;
	sv->staged_at = at;
	sv->seq++;
	s->st_txs_saved++;
}

static void mv1_save_start(struct mv1_state *s, bool final)
{
	memset(&s->save, 0, sizeof(s->save));
	s->save.final = final;
	bitmap_fill(s->dirty, s->npages);
	s->save.ndirty = s->npages;
	s->st_passes = 1;
	s->st_pages_sent = 0;
	s->st_txs_saved = 0;
	s->st_dirtied = 0;
}

static void mv1_save_drop(struct mv1_state *s)
{
	memset(&s->save, 0, sizeof(s->save));
	bitmap_zero(s->dirty, s->npages);
}

/* The running device wrote page @page: resend it if a save is under way. */
static void mv1_mark_dirty(struct mv1_state *s, u32 page)
{
	if (!mv1_is_saving(mv1_bits(s)))
		return;
	if (!test_and_set_bit(page, s->dirty)) {
		s->save.ndirty++;
		s->st_dirtied++;
	}
}

/* One write of the running device: 8 bytes of a page chosen at random. */
static void mv1_dirty_one(struct mv1_state *s)
{
	u32 page, at;

	s->rng = s->rng * 1664525u + 1013904223u;
	page = (s->rng >> 8) % s->npages;
	s->dirty_gen++;
	at = (u32)(s->dirty_gen % (MV1_PAGE / 8)) * 8;
	put_unaligned_le64(s->dirty_gen ^ ((u64)page << 40),
			   s->mem + (size_t)page * MV1_PAGE + at);
	mv1_mark_dirty(s, page);
}

static void mv1_dirty_work(struct work_struct *work)
{
	struct mv1_state *s = container_of(to_delayed_work(work),
					   struct mv1_state, dirty_work);
	u32 i;

	mutex_lock(&s->lock);
	if (mv1_bits(s) == MV1_STATE_PRECOPY && s->dirty_rate) {
		for (i = 0; i < s->dirty_rate; i++)
			mv1_dirty_one(s);
		schedule_delayed_work(&s->dirty_work,
				      msecs_to_jiffies(s->dirty_period_ms));
	}
	mutex_unlock(&s->lock);
}

/* Starts the dirtier if the device runs in pre-copy with a dirty rate set. */
static void mv1_dirty_kick(struct mv1_state *s)
{
	if (mv1_bits(s) == MV1_STATE_PRECOPY && s->dirty_rate)
		schedule_delayed_work(&s->dirty_work,
				      msecs_to_jiffies(s->dirty_period_ms));
}

/* ---- the resuming side -------------------------------------------------- */

static void mv1_resume_start(struct mv1_state *s)
{
	memset(&s->resume, 0, sizeof(s->resume));
	bitmap_zero(s->seen, s->npages);
	s->st_txs_loaded = 0;
	s->st_pages_loaded = 0;
}

/* The length of a record from its 8-byte header, or -EINVAL. */
static int mv1_record_len(struct mv1_state *s, u32 type, u32 arg)
{
	struct mv1_resume *r = &s->resume;

	if (r->end_ok)
		return -EINVAL;	/* nothing may follow END */
	switch (type) {
	case MV1_REC_HEADER:
		return (!r->header_ok && arg == MV1_STREAM_VERSION) ? MV1_HDR_REC : -EINVAL;
	case MV1_REC_PAGE:
		return (r->header_ok && arg < s->npages) ? MV1_PAGE_REC : -EINVAL;
	case MV1_REC_END:
		return (r->header_ok && arg == s->npages) ? MV1_END_REC : -EINVAL;
	}
	return -EINVAL;
}

static int mv1_apply_record(struct mv1_state *s)
{
	struct mv1_resume *r = &s->resume;
	const u8 *p = s->load_rec;
	u32 page;

	switch (get_unaligned_le32(p)) {
	case MV1_REC_HEADER:
		if (get_unaligned_le32(p + 8) != s->npages * MV1_PAGE ||
		    get_unaligned_le32(p + 12) != MV1_PAGE ||
		    get_unaligned_le32(p + 16) != s->npages ||
		    get_unaligned_le32(p + 20) != 0)
			return -EINVAL;
		r->header_ok = true;
		return 0;
	case MV1_REC_PAGE:
		page = get_unaligned_le32(p + 4);
		memcpy(s->shadow + (size_t)page * MV1_PAGE, p + MV1_REC_HDR, MV1_PAGE);
		if (!test_and_set_bit(page, s->seen))
			r->pages_seen++;
		s->st_pages_loaded++;
		return 0;
	case MV1_REC_END:
		r->end_crc = get_unaligned_le32(p + 8);
		r->end_ok = true;
		return 0;
	}
	return -EINVAL;
}

/* Feeds a transaction's payload to the decoder. */
static int mv1_feed(struct mv1_state *s, const u8 *p, u32 len)
{
	struct mv1_resume *r = &s->resume;
	u32 want, n;
	int ret;

	while (len) {
		want = r->rec_need ? r->rec_need : MV1_REC_HDR;
		n = min(len, want - r->rec_have);
		memcpy(s->load_rec + r->rec_have, p, n);
		r->rec_have += n;
		p += n;
		len -= n;
		if (r->rec_have < want)
			break;
		if (!r->rec_need) {
			ret = mv1_record_len(s, get_unaligned_le32(s->load_rec),
					     get_unaligned_le32(s->load_rec + 4));
			if (ret < 0)
				return ret;
			r->rec_need = ret;
			continue;
		}
		ret = mv1_apply_record(s);
		if (ret)
			return ret;
		r->rec_have = 0;
		r->rec_need = 0;
	}
	return 0;
}

/* data_size write while resuming: check the transaction, then load it. */
static int mv1_commit(struct mv1_state *s, u64 size)
{
	struct mv1_resume *r = &s->resume;
	u32 at = mv1_tx_at(s, r->next_seq);
	u8 *tx = s->scratch;
	int ret;

	if (mv1_bits(s) != MV1_STATE_RESUMING)
		return mv1_refuse(s, MV1_REF_WRONG_STATE);
	if (size < MV1_TX_HDR || size > chunk_size)
		return mv1_refuse(s, MV1_REF_SIZE_RANGE);
	/* A private copy: an mmapped section may change under our feet. */
	memcpy(tx, s->section + at, size);
	if (get_unaligned_le32(tx) != MV1_TX_MAGIC)
		return mv1_refuse(s, MV1_REF_TX_MAGIC);
	if (get_unaligned_le32(tx + 4) != r->next_seq)
		return mv1_refuse(s, MV1_REF_TX_SEQ);
	if (get_unaligned_le32(tx + 8) != size)
		return mv1_refuse(s, MV1_REF_TX_SIZE);
	if (get_unaligned_le32(tx + 12) != mv1_crc(tx + MV1_TX_HDR, size - MV1_TX_HDR))
		return mv1_refuse(s, MV1_REF_TX_CRC);
	ret = mv1_feed(s, tx + MV1_TX_HDR, size - MV1_TX_HDR);
	if (ret) {
		/* Intact transactions that do not decode: the device failed. */
		mv1_enter_error(s);
		return mv1_refuse(s, MV1_REF_STREAM);
	}
	r->next_seq++;
	s->st_txs_loaded++;
	return 0;
}

/* RESUMING -> RUNNING: the state must be whole and match the source's crc. */
static bool mv1_resume_complete(struct mv1_state *s)
{
	struct mv1_resume *r = &s->resume;

	return r->header_ok && r->end_ok && !r->rec_have && !r->rec_need &&
	       r->pages_seen == s->npages &&
	       mv1_crc(s->shadow, (size_t)s->npages * MV1_PAGE) == r->end_crc;
}

/* ---- device_state ------------------------------------------------------- */

/*
 * The uAPI's transitions, plus the cancel arcs back to RUNNING. STOP -> SAVING is QEMU
 * 5.2-7.2's save of a stopped VM: vfio_save_setup ORs SAVING into the state it finds.
 */
static bool mv1_is_arc(u32 from, u32 to)
{
	switch (from) {
	case MV1_STATE_RUNNING:
		return to == MV1_STATE_STOP || to == MV1_STATE_STOPCOPY ||
		       to == MV1_STATE_PRECOPY || to == MV1_STATE_RESUMING;
	case MV1_STATE_PRECOPY:
		return to == MV1_STATE_STOPCOPY || to == MV1_STATE_RUNNING;
	case MV1_STATE_STOPCOPY:
		return to == MV1_STATE_STOP || to == MV1_STATE_RUNNING;
	case MV1_STATE_STOP:
		return to == MV1_STATE_RUNNING || to == MV1_STATE_RESUMING ||
		       to == MV1_STATE_STOPCOPY;
	case MV1_STATE_RESUMING:
		return to == MV1_STATE_RUNNING;
	}
	return false;
}

static int mv1_write_state(struct mv1_state *s, u32 value)
{
	u32 from = mv1_bits(s), to = value & MV1_STATE_MASK;

	if (!mv1_requestable(from))
		return mv1_refuse(s, MV1_REF_IN_ERROR);
	if ((value ^ s->device_state) & ~MV1_STATE_MASK)
		return mv1_refuse(s, MV1_REF_RESERVED_BITS);
	if (!mv1_requestable(to))
		return mv1_refuse(s, MV1_REF_NOT_REQUESTABLE);
	if (from == to)
		return 0;
	if (!mv1_is_arc(from, to))
		return mv1_refuse(s, MV1_REF_NO_ARC);

	switch (from) {
	case MV1_STATE_RUNNING:
		if (mv1_is_saving(to))
			mv1_save_start(s, to == MV1_STATE_STOPCOPY);
		else if (to == MV1_STATE_RESUMING)
			mv1_resume_start(s);
		break;
	case MV1_STATE_PRECOPY:
		if (to == MV1_STATE_STOPCOPY)
			s->save.final = true;	/* stopped: the staged chunk stays */
		else
			mv1_save_drop(s);	/* cancelled */
		break;
	case MV1_STATE_STOPCOPY:
		if (to == MV1_STATE_STOP) {
			if (mv1_stream_left(s) || s->save.staged)
				return mv1_refuse(s, MV1_REF_DATA_PENDING);
			s->st_saves_done++;
		}
		mv1_save_drop(s);
		break;
	case MV1_STATE_STOP:
		if (to == MV1_STATE_RESUMING)
			mv1_resume_start(s);
		else if (to == MV1_STATE_STOPCOPY)
			mv1_save_start(s, true);
		break;
	case MV1_STATE_RESUMING:
		if (!mv1_resume_complete(s)) {
			/* A driver that cannot use the state it was given fails. */
			mv1_enter_error(s);
			return mv1_refuse(s, MV1_REF_INCOMPLETE);
		}
		swap(s->mem, s->shadow);
		s->st_resumes_done++;
		break;
	}
	s->device_state = value;
	mv1_dirty_kick(s);
	return 0;
}

static void mv1_reset(struct mv1_state *s)
{
	s->device_state = MV1_RESERVED_BITS | MV1_STATE_RUNNING;
	mv1_save_drop(s);
	memset(&s->resume, 0, sizeof(s->resume));
	s->dirty_rate = 0;
	s->dirty_per_iter = 0;
	s->fail_next = MV1_FAIL_NONE;
	s->st_resets++;
}

/* ---- region accesses ---------------------------------------------------- */

static ssize_t mv1_put(char __user *buf, const void *v, size_t n)
{
	return copy_to_user(buf, v, n) ? -EFAULT : (ssize_t)n;
}

static ssize_t mv1_mig_read(struct mv1_state *s, char __user *buf, size_t count, u64 off)
{
	u32 bits = mv1_bits(s), i;
	u64 v64, at;
	int ret;

	if (off < MV1_INFO_SIZE) {
		if (off == MV1_OFF_STATE && count == 4)
			return mv1_put(buf, &s->device_state, 4);
		if (count != 8)
			return mv1_refuse(s, MV1_REF_ACCESS);
		switch (off) {
		case MV1_OFF_PENDING:
			ret = mv1_fault(s, MV1_FAIL_PENDING_READ);
			if (ret)
				return ret;
			if (!mv1_is_saving(bits))
				return mv1_refuse(s, MV1_REF_WRONG_STATE);
			/* Starts an iteration: the chunk read before is consumed. */
			s->save.staged = 0;
			if (bits == MV1_STATE_PRECOPY)
				for (i = 0; i < s->dirty_per_iter; i++)
					mv1_dirty_one(s);
			v64 = mv1_pending(s);
			return mv1_put(buf, &v64, 8);
		case MV1_OFF_DATA_OFFSET:
			ret = mv1_fault(s, MV1_FAIL_DATA_OFFSET_READ);
			if (ret)
				return ret;
			if (bits == MV1_STATE_RESUMING) {
				v64 = s->data_base + mv1_tx_at(s, s->resume.next_seq);
				return mv1_put(buf, &v64, 8);
			}
			if (!mv1_is_saving(bits))
				return mv1_refuse(s, MV1_REF_WRONG_STATE);
			if (!s->save.staged) {
				if (!mv1_stream_left(s))
					return mv1_refuse(s, MV1_REF_NOTHING_PENDING);
				mv1_stage(s);
			}
			v64 = s->data_base + s->save.staged_at;
			return mv1_put(buf, &v64, 8);
		case MV1_OFF_DATA_SIZE:
			ret = mv1_fault(s, MV1_FAIL_DATA_SIZE_READ);
			if (ret)
				return ret;
			if (!mv1_is_saving(bits))
				return mv1_refuse(s, MV1_REF_WRONG_STATE);
			if (!s->save.staged)
				return mv1_refuse(s, MV1_REF_NOT_STAGED);
			v64 = s->save.staged;
			return mv1_put(buf, &v64, 8);
		}
		return mv1_refuse(s, MV1_REF_ACCESS);
	}
	if (off < s->data_base || count > s->section_len ||
	    off - s->data_base > s->section_len - count)
		return mv1_refuse(s, MV1_REF_ACCESS);
	at = off - s->data_base;
	if (!mv1_is_saving(bits))
		return mv1_refuse(s, MV1_REF_WRONG_STATE);
	if (!s->save.staged)
		return mv1_refuse(s, MV1_REF_NOT_STAGED);
	if (at < s->save.staged_at || at + count > s->save.staged_at + s->save.staged)
		return mv1_refuse(s, MV1_REF_OUTSIDE_STAGED);
	return mv1_put(buf, s->section + at, count);
}

static ssize_t mv1_mig_write(struct mv1_state *s, const char __user *buf, size_t count, u64 off)
{
	u32 v32;
	u64 v64;
	int ret;

	if (off < MV1_INFO_SIZE) {
		if (off == MV1_OFF_STATE && count == 4) {
			if (copy_from_user(&v32, buf, 4))
				return -EFAULT;
			ret = mv1_fault(s, MV1_FAIL_STATE_WRITE);
			if (!ret)
				ret = mv1_write_state(s, v32);
			return ret ? ret : 4;
		}
		if (count != 8)
			return mv1_refuse(s, MV1_REF_ACCESS);
		switch (off) {
		case MV1_OFF_PENDING:
		case MV1_OFF_DATA_OFFSET:
			return mv1_refuse(s, MV1_REF_READ_ONLY);
		case MV1_OFF_DATA_SIZE:
			if (copy_from_user(&v64, buf, 8))
				return -EFAULT;
			ret = mv1_fault(s, MV1_FAIL_DATA_SIZE_WRITE);
			if (!ret)
				ret = mv1_commit(s, v64);
			return ret ? ret : 8;
		}
		return mv1_refuse(s, MV1_REF_ACCESS);
	}
	if (off < s->data_base || count > s->section_len ||
	    off - s->data_base > s->section_len - count)
		return mv1_refuse(s, MV1_REF_ACCESS);
	if (mv1_bits(s) != MV1_STATE_RESUMING)
		return mv1_refuse(s, MV1_REF_WRONG_STATE);
	if (copy_from_user(s->section + (off - s->data_base), buf, count))
		return -EFAULT;
	return count;
}

static u32 mv1_reg_read(struct mv1_state *s, u32 reg)
{
	switch (reg) {
	case MV1_REG_ID:
		return MV1_ID;
	case MV1_REG_VERSION:
		return 1;
	case MV1_REG_STATE_SIZE:
		return s->npages * MV1_PAGE;
	case MV1_REG_CHUNK_SIZE:
		return chunk_size;
	case MV1_REG_PAGE_SIZE:
		return MV1_PAGE;
	case MV1_REG_FLAGS:
		return s->mmap ? MV1_FLAG_MMAP : 0;
	case MV1_REG_DEVICE_STATE:
		return s->device_state;
	case MV1_REG_DIRTY_RATE:
		return s->dirty_rate;
	case MV1_REG_DIRTY_PERIOD:
		return s->dirty_period_ms;
	case MV1_REG_DIRTY_PER_ITER:
		return s->dirty_per_iter;
	case MV1_REG_FAIL_NEXT:
		return s->fail_next;
	case MV1_REG_SAVE_PASSES:
		return s->st_passes;
	case MV1_REG_SAVE_PAGES:
		return s->st_pages_sent;
	case MV1_REG_SAVE_TXS:
		return s->st_txs_saved;
	case MV1_REG_SAVE_DIRTIED:
		return s->st_dirtied;
	case MV1_REG_LOAD_TXS:
		return s->st_txs_loaded;
	case MV1_REG_LOAD_PAGES:
		return s->st_pages_loaded;
	case MV1_REG_REFUSALS:
		return s->st_refusals;
	case MV1_REG_LAST_REFUSAL:
		return s->st_last_refusal;
	case MV1_REG_RESETS:
		return s->st_resets;
	case MV1_REG_SAVES_DONE:
		return s->st_saves_done;
	case MV1_REG_RESUMES_DONE:
		return s->st_resumes_done;
	}
	return 0;
}

static void mv1_reg_write(struct mv1_state *s, u32 reg, u32 v)
{
	switch (reg) {
	case MV1_REG_DIRTY_RATE:
		s->dirty_rate = min_t(u32, v, s->npages);
		mv1_dirty_kick(s);
		break;
	case MV1_REG_DIRTY_PERIOD:
		s->dirty_period_ms = clamp_t(u32, v, 1, 1000);
		break;
	case MV1_REG_DIRTY_PER_ITER:
		s->dirty_per_iter = min_t(u32, v, s->npages);
		break;
	case MV1_REG_FORCE_ERROR:
		if (v)
			mv1_enter_error(s);
		break;
	case MV1_REG_FAIL_NEXT:
		s->fail_next = v <= MV1_FAIL_MAX ? v : MV1_FAIL_NONE;
		break;
	}
	/* Read-only registers ignore writes, as hardware does. */
}

static ssize_t mv1_cfg_read(struct mv1_state *s, char __user *buf, size_t count, u64 off)
{
	if (off >= MV1_CONFIG_SIZE || count > MV1_CONFIG_SIZE - off)
		return -EINVAL;
	return mv1_put(buf, s->vconfig + off, count);
}

static ssize_t mv1_cfg_write(struct mv1_state *s, const char __user *buf, size_t count, u64 off)
{
	u8 v[4];
	u32 bar, val;

	if (off >= MV1_CONFIG_SIZE || count > MV1_CONFIG_SIZE - off)
		return -EINVAL;
	/* Config accesses are 1, 2 or 4 bytes, naturally aligned. */
	if ((count != 1 && count != 2 && count != 4) || (off & (count - 1)))
		return -EINVAL;
	if (copy_from_user(v, buf, count))
		return -EFAULT;
	switch (off) {
	case PCI_COMMAND:
		if (count >= 2) {
			val = get_unaligned_le16(v) &
			      (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE);
			put_unaligned_le16(val, s->vconfig + PCI_COMMAND);
		}
		break;
	case PCI_BASE_ADDRESS_0:
	case PCI_BASE_ADDRESS_1:
		if (count != 4)
			break;
		/* 32-bit memory BARs; sizing reads back the size mask. */
		bar = (off - PCI_BASE_ADDRESS_0) / 4;
		val = get_unaligned_le32(v) & ~(s->bar_size[bar] - 1);
		put_unaligned_le32(val, s->vconfig + off);
		break;
	}
	/* Other registers are read-only. */
	return count;
}

static ssize_t mv1_read(struct vfio_device *vdev, char __user *buf, size_t count, loff_t *ppos)
{
	struct mv1_state *s = container_of(vdev, struct mv1_state, vdev);
	u64 pos = *ppos, off = pos & MV1_OFFSET_MASK;
	u32 v;
	ssize_t ret;

	if (!count)
		return 0;
	mutex_lock(&s->lock);
	switch (MV1_OFFSET_TO_INDEX(pos)) {
	case VFIO_PCI_BAR0_REGION_INDEX:
		if (count != 4 || (off & 3) || off >= MV1_REGS_SIZE) {
			ret = -EINVAL;
			break;
		}
		v = mv1_reg_read(s, off);
		ret = mv1_put(buf, &v, 4);
		break;
	case VFIO_PCI_BAR1_REGION_INDEX:
		if (off >= (u64)s->npages * MV1_PAGE ||
		    count > (u64)s->npages * MV1_PAGE - off) {
			ret = -EINVAL;
			break;
		}
		ret = mv1_put(buf, s->mem + off, count);
		break;
	case VFIO_PCI_CONFIG_REGION_INDEX:
		ret = mv1_cfg_read(s, buf, count, off);
		break;
	case MV1_MIG_REGION_INDEX:
		ret = mv1_mig_read(s, buf, count, off);
		break;
	default:
		ret = -EINVAL;
	}
	mutex_unlock(&s->lock);
	return ret;
}

static ssize_t mv1_write(struct vfio_device *vdev, const char __user *buf, size_t count,
			 loff_t *ppos)
{
	struct mv1_state *s = container_of(vdev, struct mv1_state, vdev);
	u64 pos = *ppos, off = pos & MV1_OFFSET_MASK, size;
	u32 v, p;
	ssize_t ret;

	if (!count)
		return 0;
	mutex_lock(&s->lock);
	switch (MV1_OFFSET_TO_INDEX(pos)) {
	case VFIO_PCI_BAR0_REGION_INDEX:
		if (count != 4 || (off & 3) || off >= MV1_REGS_SIZE) {
			ret = -EINVAL;
			break;
		}
		if (copy_from_user(&v, buf, 4)) {
			ret = -EFAULT;
			break;
		}
		mv1_reg_write(s, off, v);
		ret = 4;
		break;
	case VFIO_PCI_BAR1_REGION_INDEX:
		size = (u64)s->npages * MV1_PAGE;
		if (off >= size || count > size - off) {
			ret = -EINVAL;
			break;
		}
		/* Only a running device (RUNNING or PRE-COPY) changes its state. */
		if (!(mv1_bits(s) & MV1_STATE_RUNNING) || !mv1_requestable(mv1_bits(s))) {
			mv1_refuse(s, MV1_REF_NOT_RUNNING);
			ret = -EBUSY;
			break;
		}
		if (copy_from_user(s->mem + off, buf, count)) {
			ret = -EFAULT;
			break;
		}
		for (p = off / MV1_PAGE; p <= (off + count - 1) / MV1_PAGE; p++)
			mv1_mark_dirty(s, p);
		ret = count;
		break;
	case VFIO_PCI_CONFIG_REGION_INDEX:
		ret = mv1_cfg_write(s, buf, count, off);
		break;
	case MV1_MIG_REGION_INDEX:
		ret = mv1_mig_write(s, buf, count, off);
		break;
	default:
		ret = -EINVAL;
	}
	mutex_unlock(&s->lock);
	return ret;
}

static int mv1_mmap(struct vfio_device *vdev, struct vm_area_struct *vma)
{
	struct mv1_state *s = container_of(vdev, struct mv1_state, vdev);
	u64 pos = (u64)vma->vm_pgoff << PAGE_SHIFT;
	u64 off = pos & MV1_OFFSET_MASK;
	u64 len = vma->vm_end - vma->vm_start;

	/* No lock: the section buffer is fixed for the device's lifetime. */
	if (!s->mmap || MV1_OFFSET_TO_INDEX(pos) != MV1_MIG_REGION_INDEX)
		return -EINVAL;
	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	if (off < s->data_base || len > s->section_len ||
	    off - s->data_base > s->section_len - len)
		return -EINVAL;
	return remap_vmalloc_range(vma, s->section, (off - s->data_base) >> PAGE_SHIFT);
}

/* ---- ioctls ------------------------------------------------------------- */

static int mv1_region_info(struct mv1_state *s, struct vfio_region_info *info,
			   struct vfio_info_cap *caps)
{
	struct vfio_region_info_cap_type type = {
		.header.id = VFIO_REGION_INFO_CAP_TYPE,
		.header.version = 1,
		.type = MV1_REGION_TYPE_MIGRATION,
		.subtype = MV1_REGION_SUBTYPE_MIGRATION,
	};
	struct vfio_region_info_cap_sparse_mmap *sparse;
	size_t sparse_size;
	int ret;

	info->offset = MV1_INDEX_TO_OFFSET(info->index);
	info->flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
	info->size = 0;
	switch (info->index) {
	case VFIO_PCI_BAR0_REGION_INDEX:
		info->size = MV1_REGS_SIZE;
		return 0;
	case VFIO_PCI_BAR1_REGION_INDEX:
		info->size = (u64)s->npages * MV1_PAGE;
		return 0;
	case VFIO_PCI_CONFIG_REGION_INDEX:
		info->size = MV1_CONFIG_SIZE;
		return 0;
	case VFIO_PCI_VGA_REGION_INDEX:
		return -EINVAL;	/* not a VGA device */
	case MV1_MIG_REGION_INDEX:
		break;
	default:
		if (info->index >= MV1_NUM_REGIONS)
			return -EINVAL;
		info->flags = 0;	/* BAR2-5, ROM: absent */
		return 0;
	}

	info->size = s->data_base + s->section_len;
	ret = vfio_info_add_capability(caps, &type.header, sizeof(type));
	if (ret || !s->mmap)
		return ret;

	info->flags |= VFIO_REGION_INFO_FLAG_MMAP;
	sparse_size = struct_size(sparse, areas, 1);
	sparse = kzalloc(sparse_size, GFP_KERNEL);
	if (!sparse)
		return -ENOMEM;
	sparse->header.id = VFIO_REGION_INFO_CAP_SPARSE_MMAP;
	sparse->header.version = 1;
	sparse->nr_areas = 1;
	sparse->areas[0].offset = s->data_base;
	sparse->areas[0].size = s->section_len;
	ret = vfio_info_add_capability(caps, &sparse->header, sparse_size);
	kfree(sparse);
	return ret;
}

static long mv1_ioctl_region_info(struct mv1_state *s, void __user *arg)
{
	unsigned long minsz = offsetofend(struct vfio_region_info, offset);
	struct vfio_info_cap caps = { .buf = NULL, .size = 0 };
	struct vfio_region_info info;
	int ret;

	if (copy_from_user(&info, arg, minsz))
		return -EFAULT;
	if (info.argsz < minsz)
		return -EINVAL;
	ret = mv1_region_info(s, &info, &caps);
	if (ret) {
		kfree(caps.buf);
		return ret;
	}
	if (caps.size) {
		info.flags |= VFIO_REGION_INFO_FLAG_CAPS;
		if (info.argsz < sizeof(info) + caps.size) {
			/* Too small for the chain: say how much is needed. */
			info.argsz = sizeof(info) + caps.size;
			info.cap_offset = 0;
		} else {
			vfio_info_cap_shift(&caps, sizeof(info));
			if (copy_to_user(arg + sizeof(info), caps.buf, caps.size)) {
				kfree(caps.buf);
				return -EFAULT;
			}
			info.cap_offset = sizeof(info);
		}
		kfree(caps.buf);
	}
	return copy_to_user(arg, &info, minsz) ? -EFAULT : 0;
}

static long mv1_ioctl(struct vfio_device *vdev, unsigned int cmd, unsigned long arg)
{
	struct mv1_state *s = container_of(vdev, struct mv1_state, vdev);
	void __user *uarg = (void __user *)arg;
	unsigned long minsz;

	switch (cmd) {
	case VFIO_DEVICE_GET_INFO: {
		struct vfio_device_info info;

		minsz = offsetofend(struct vfio_device_info, num_irqs);
		if (copy_from_user(&info, uarg, minsz))
			return -EFAULT;
		if (info.argsz < minsz)
			return -EINVAL;
		info.flags = VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET;
		info.num_regions = MV1_NUM_REGIONS;
		info.num_irqs = VFIO_PCI_NUM_IRQS;
		return copy_to_user(uarg, &info, minsz) ? -EFAULT : 0;
	}
	case VFIO_DEVICE_GET_REGION_INFO:
		return mv1_ioctl_region_info(s, uarg);
	case VFIO_DEVICE_GET_IRQ_INFO: {
		struct vfio_irq_info info;

		minsz = offsetofend(struct vfio_irq_info, count);
		if (copy_from_user(&info, uarg, minsz))
			return -EFAULT;
		if (info.argsz < minsz || info.index >= VFIO_PCI_NUM_IRQS)
			return -EINVAL;
		/* No interrupts. */
		info.flags = 0;
		info.count = 0;
		return copy_to_user(uarg, &info, minsz) ? -EFAULT : 0;
	}
	case VFIO_DEVICE_SET_IRQS:
		return -EINVAL;
	case VFIO_DEVICE_RESET:
		mutex_lock(&s->lock);
		mv1_reset(s);
		mutex_unlock(&s->lock);
		return 0;
	}
	return -ENOTTY;
}

/* ---- device life cycle -------------------------------------------------- */

static void mv1_init_config(struct mv1_state *s)
{
	u8 *c = s->vconfig;

	put_unaligned_le16(0x4d56, c + PCI_VENDOR_ID);		/* made up: "VM" */
	put_unaligned_le16(s->mmap ? 0x3102 : 0x3101, c + PCI_DEVICE_ID);
	put_unaligned_le16(0, c + PCI_COMMAND);
	put_unaligned_le16(0, c + PCI_STATUS);
	c[PCI_REVISION_ID] = 1;
	c[PCI_CLASS_PROG] = 0;
	put_unaligned_le16(0xff00, c + PCI_CLASS_DEVICE);	/* unassigned class */
	c[PCI_HEADER_TYPE] = PCI_HEADER_TYPE_NORMAL;
	s->bar_size[0] = MV1_REGS_SIZE;
	s->bar_size[1] = roundup_pow_of_two(s->npages * MV1_PAGE);
	put_unaligned_le32(PCI_BASE_ADDRESS_SPACE_MEMORY, c + PCI_BASE_ADDRESS_0);
	put_unaligned_le32(PCI_BASE_ADDRESS_SPACE_MEMORY, c + PCI_BASE_ADDRESS_1);
	put_unaligned_le16(0x4d56, c + PCI_SUBSYSTEM_VENDOR_ID);
	put_unaligned_le16(0x0001, c + PCI_SUBSYSTEM_ID);
}

static void mv1_free_buffers(struct mv1_state *s)
{
	bitmap_free(s->seen);
	bitmap_free(s->dirty);
	kfree(s->load_rec);
	kfree(s->save_rec);
	vfree(s->scratch);
	vfree(s->section);
	vfree(s->shadow);
	vfree(s->mem);
}

static int mv1_init_dev(struct vfio_device *vdev)
{
	struct mv1_state *s = container_of(vdev, struct mv1_state, vdev);
	struct mdev_device *mdev = to_mdev_device(vdev->dev);
	struct mv1_type *type = container_of(mdev->type, struct mv1_type, type);
	int avail = atomic_read(&mv1_available);
	size_t bytes;
	u32 i;

	do {
		if (avail <= 0)
			return -ENOSPC;
	} while (!atomic_try_cmpxchg(&mv1_available, &avail, avail - 1));

	s->mmap = type->mmap;
	s->npages = state_size / MV1_PAGE;
	bytes = (size_t)s->npages * MV1_PAGE;
	s->data_base = s->mmap ? PAGE_SIZE : MV1_TRAPPED_BASE;
	s->section_len = s->mmap ? chunk_size : chunk_size + MV1_TRAPPED_SHIFT;

	s->mem = vzalloc(bytes);
	s->shadow = vzalloc(bytes);
	/* vmalloc_user: zeroed, and remap_vmalloc_range() may map it. */
	s->section = s->mmap ? vmalloc_user(s->section_len) : vzalloc(s->section_len);
	s->scratch = vmalloc(chunk_size);
	s->save_rec = kmalloc(MV1_REC_MAX, GFP_KERNEL);
	s->load_rec = kmalloc(MV1_REC_MAX, GFP_KERNEL);
	s->dirty = bitmap_zalloc(s->npages, GFP_KERNEL);
	s->seen = bitmap_zalloc(s->npages, GFP_KERNEL);
	if (!s->mem || !s->shadow || !s->section || !s->scratch || !s->save_rec ||
	    !s->load_rec || !s->dirty || !s->seen) {
		mv1_free_buffers(s);
		atomic_inc(&mv1_available);
		return -ENOMEM;
	}

	/* Initial contents: a recognisable pattern, per device. */
	s->rng = 0x9e3779b9u * (u32)atomic_inc_return(&mv1_serial);
	for (i = 0; i < s->npages; i++)
		put_unaligned_le32(i, s->mem + (size_t)i * MV1_PAGE);

	mutex_init(&s->lock);
	INIT_DELAYED_WORK(&s->dirty_work, mv1_dirty_work);
	s->device_state = MV1_RESERVED_BITS | MV1_STATE_RUNNING;
	s->dirty_period_ms = 1;
	mv1_init_config(s);
	return 0;
}

static void mv1_release_dev(struct vfio_device *vdev)
{
	struct mv1_state *s = container_of(vdev, struct mv1_state, vdev);

	cancel_delayed_work_sync(&s->dirty_work);
	mv1_free_buffers(s);
	mutex_destroy(&s->lock);
	atomic_inc(&mv1_available);
}

static int mv1_probe(struct mdev_device *mdev)
{
	struct mv1_state *s;
	int ret;

	s = vfio_alloc_device(mv1_state, vdev, &mdev->dev, &mv1_dev_ops);
	if (IS_ERR(s))
		return PTR_ERR(s);
	ret = vfio_register_emulated_iommu_dev(&s->vdev);
	if (ret) {
		vfio_put_device(&s->vdev);
		return ret;
	}
	dev_set_drvdata(&mdev->dev, s);
	return 0;
}

static void mv1_remove(struct mdev_device *mdev)
{
	struct mv1_state *s = dev_get_drvdata(&mdev->dev);

	vfio_unregister_group_dev(&s->vdev);
	vfio_put_device(&s->vdev);
}

static unsigned int mv1_get_available(struct mdev_type *mtype)
{
	return max(atomic_read(&mv1_available), 0);
}

static ssize_t mv1_show_description(struct mdev_type *mtype, char *buf)
{
	struct mv1_type *type = container_of(mtype, struct mv1_type, type);

	return sysfs_emit(buf,
			  "VFIO v1 migration region, %s data section; %u bytes of state, chunks of %u bytes\n",
			  type->mmap ? "mmapped (sparse mmap)" : "trapped", state_size, chunk_size);
}

static const struct vfio_device_ops mv1_dev_ops = {
	.name = "vfio-mig-v1-sample",
	.init = mv1_init_dev,
	.release = mv1_release_dev,
	.read = mv1_read,
	.write = mv1_write,
	.mmap = mv1_mmap,
	.ioctl = mv1_ioctl,
	.bind_iommufd = vfio_iommufd_emulated_bind,
	.unbind_iommufd = vfio_iommufd_emulated_unbind,
	.attach_ioas = vfio_iommufd_emulated_attach_ioas,
	.detach_ioas = vfio_iommufd_emulated_detach_ioas,
};

static struct mdev_driver mv1_driver = {
	.device_api = VFIO_DEVICE_API_PCI_STRING,
	.driver = {
		.name = MV1_NAME,
		.owner = THIS_MODULE,
		.mod_name = KBUILD_MODNAME,
	},
	.probe = mv1_probe,
	.remove = mv1_remove,
	.get_available = mv1_get_available,
	.show_description = mv1_show_description,
};

static const struct class mv1_class = {
	.name = MV1_CLASS_NAME,
};

static void mv1_parent_release(struct device *dev)
{
	kfree(container_of(dev, struct mv1_parent, dev));
}

static int __init mv1_module_init(void)
{
	int ret;

	if (state_size < MV1_PAGE || state_size > (64u << 20) ||
	    chunk_size < PAGE_SIZE || chunk_size > (4u << 20)) {
		pr_err(MV1_NAME ": state_size must be 4 KiB-64 MiB, chunk_size 4 KiB-4 MiB\n");
		return -EINVAL;
	}
	state_size = round_up(state_size, MV1_PAGE);
	chunk_size = round_up(chunk_size, PAGE_SIZE);
	atomic_set(&mv1_available, min_t(unsigned int, max_devices, INT_MAX));

	ret = class_register(&mv1_class);
	if (ret)
		return ret;
	ret = mdev_register_driver(&mv1_driver);
	if (ret)
		goto err_class;

	mv1_parent = kzalloc(sizeof(*mv1_parent), GFP_KERNEL);
	if (!mv1_parent) {
		ret = -ENOMEM;
		goto err_driver;
	}
	device_initialize(&mv1_parent->dev);
	mv1_parent->dev.class = &mv1_class;
	mv1_parent->dev.release = mv1_parent_release;
	ret = dev_set_name(&mv1_parent->dev, MV1_PARENT_NAME);
	if (ret)
		goto err_put;
	ret = device_add(&mv1_parent->dev);
	if (ret)
		goto err_put;
	ret = mdev_register_parent(&mv1_parent->parent, &mv1_parent->dev, &mv1_driver,
				   mv1_mdev_types, ARRAY_SIZE(mv1_mdev_types));
	if (ret)
		goto err_del;
	pr_info(MV1_NAME ": loaded: state_size %u, chunk_size %u, max_devices %u\n",
		state_size, chunk_size, max_devices);
	return 0;

err_del:
	device_del(&mv1_parent->dev);
err_put:
	put_device(&mv1_parent->dev);
	mv1_parent = NULL;
err_driver:
	mdev_unregister_driver(&mv1_driver);
err_class:
	class_unregister(&mv1_class);
	return ret;
}

static void __exit mv1_module_exit(void)
{
	mdev_unregister_parent(&mv1_parent->parent);
	device_unregister(&mv1_parent->dev);
	mv1_parent = NULL;
	mdev_unregister_driver(&mv1_driver);
	class_unregister(&mv1_class);
	pr_info(MV1_NAME ": unloaded\n");
}

module_init(mv1_module_init);
module_exit(mv1_module_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Sample mediated device implementing the VFIO v1 migration region");
MODULE_AUTHOR("vfio-mig project");
